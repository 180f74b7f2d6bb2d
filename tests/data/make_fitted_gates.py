"""Regenerate the gates fitted on the tiny test models: tests/data/*_exit_learned.safetensors (learned exit
gates), tests/data/llama_tiny_mlp_skip.safetensors (MLP routers for half the token-work) and
tests/data/llama_tiny_mlp_width.safetensors (MLP width thresholds for half the multiply-adds)."""
import sys
sys.path.insert(0, "tests")
import torch
import dynasparse
from dynasparse import ExitGateConfig, MLPSkipConfig, MLPWidthConfig
from default_configs import MLP_GATES, MLP_WIDTHS, VOCAB, bert, encoder_inputs, llama

g = torch.Generator().manual_seed(5)
batches = []
for _ in range(12):
    ids = torch.randint(0, VOCAB, (8, 48), generator=g)
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
enc = dynasparse.optimize(bert(), ExitGateConfig(criterion="learned", max_quality_drop=0.2), example_kwargs=encoder_inputs())
r = dynasparse.fit(enc, batches, held_out=0.25, save="tests/data/bert_tiny_exit_learned.safetensors")
print(r.exits)
dec = dynasparse.optimize(llama(), ExitGateConfig(criterion="learned", max_quality_drop=0.3),
                          example_kwargs={"input_ids": torch.randint(1, VOCAB, (2, 16))})
ids = torch.randint(1, VOCAB, (24, 64), generator=g)
r = dynasparse.fit(dec, ids, held_out=0.25, save="tests/data/llama_tiny_exit_learned.safetensors")
print(r.exits)
routed = dynasparse.optimize(llama(), MLPSkipConfig(target_skip=0.5), example_kwargs={"input_ids": torch.randint(1, VOCAB, (2, 32))})
r = dynasparse.fit(routed, torch.randint(1, VOCAB, (12, 32), generator=g), save=MLP_GATES)
print(r.skipped)
thresholded = dynasparse.optimize(llama(), MLPWidthConfig(target_skip=0.5),
                                  example_kwargs={"input_ids": torch.randint(1, VOCAB, (2, 32))})
r = dynasparse.fit(thresholded, torch.randint(1, VOCAB, (12, 32), generator=g), save=MLP_WIDTHS)
print(r.skipped)
