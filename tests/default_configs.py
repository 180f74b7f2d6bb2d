"""One default config per technique and mode, as kvpress lists its presses: the cross-technique tests in
``test_techniques.py`` are parametrized by this list, so a new technique adds its entries here and gets
identity, JSON, opcheck, batching and composition tests for free.

Each entry: (id, model kind, a config with sparsity, the same technique at zero sparsity, whether the
technique's ONNX export reproduces it: False where the export has no spelling of it yet). Kinds: "encoder"
(a BERT classifier), "decoder" (a Llama generating), "dit" (diffusers' DiT, one denoising call), "dit-sampled"
(the same DiT sampling a few DDIM steps) and "masked-lm" (a masked-diffusion BERT unmasking its answer step by
step).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as hf

from dynasparse import (DelayedKVConfig, ExitGateConfig, KVEvictionConfig, MLPSkipConfig, MLPWidthConfig,
                        SparseAttentionConfig, TokenCacheConfig, TokenMergeConfig)
from dynasparse.config import BaseConfig
from dynasparse.kernels.estimators import ESTIMATORS
from dynasparse.kernels.policies import POLICIES

VOCAB = 128


@dataclass(frozen=True)
class Default:
    id: str
    kind: str  # "encoder": a BERT classifier called on a batch; "decoder": a Llama generating; "dit": a DiT;
    #            "dit-sampled": a DiT sampling (dynasparse.sample); "masked-lm": a masked-diffusion BERT unmasking
    #            (dynasparse.unmask)
    sparse: BaseConfig
    zero: BaseConfig
    exports: bool = True


def _sparse(**kwargs) -> SparseAttentionConfig:
    return SparseAttentionConfig(block_size=16, min_seq_len=32, **kwargs)


def _kv(policy: str, budget, **kwargs) -> KVEvictionConfig:
    return KVEvictionConfig(policy=policy, budget=budget, sink=2, recent=4, chunk_size=24, **kwargs)


HEAD_SCORES = str(Path(__file__).parent / "data" / "llama_tiny_heads.json")  # retrieval scores for llama()


MLP_GATES = str(Path(__file__).parent / "data" / "llama_tiny_mlp_skip.safetensors")  # dynasparse.fit on llama()
MLP_WIDTHS = str(Path(__file__).parent / "data" / "llama_tiny_mlp_width.safetensors")
# learned exit gates fitted by dynasparse.fit (random tokens, a 20% / 30% quality target) on bert() / llama(),
# MLP routers fitted for half the token-work and MLP width thresholds for half the multiply-adds;
# `python tests/data/make_fitted_gates.py` (from the repo root) writes them again
ENCODER_EXIT_GATES = str(Path(__file__).parent / "data" / "bert_tiny_exit_learned.safetensors")
EXIT_GATES = str(Path(__file__).parent / "data" / "llama_tiny_exit_learned.safetensors")

REPEAT = (21, 22, 23, 24)  # stands in for dynasparse.repeat_prompt(tokenizer) on the tiny decoders

DEFAULTS = [
    Default("merge-bipartite", "encoder", TokenMergeConfig(keep_ratio=0.5), TokenMergeConfig(r=0)),
    Default("merge-prune", "encoder", TokenMergeConfig(r=4, mode="prune"), TokenMergeConfig(r=0, mode="prune")),
    Default("sparse-encoder", "encoder", _sparse(keep_ratio=0.5), _sparse(keep_ratio=1.0)),
    Default("exit-staged", "encoder", ExitGateConfig(threshold=0.3), ExitGateConfig(threshold=1.0)),
    Default("exit-learned", "encoder", ExitGateConfig(criterion="learned", fitted=ENCODER_EXIT_GATES),
            ExitGateConfig(criterion="learned", fitted=ENCODER_EXIT_GATES, threshold=1.0)),
    # a decode step over a cache exports dense attention (sparse chunks) or refuses (query-aware decode)
    *[Default(f"sparse-{name.replace('_', '-')}", "decoder", _sparse(keep_ratio=0.5, estimator=name, window=16),
              _sparse(keep_ratio=1.0, estimator=name, window=16), exports=False)
      for name in ESTIMATORS],  # every block estimator, as registered
    Default("sparse-query-aware-decode", "decoder", _sparse(decode_keep=0.25), _sparse(keep_ratio=1.0),
            exports=False),
    *[Default(f"kv-{policy}", "decoder", _kv(policy, 32), _kv(policy, 10_000))
      for policy in POLICIES if policy != "full"],  # every eviction policy, as registered
    # half the KV heads keep a KVzip-scored budget, the others sinks + recent (every head keeps all at zero)
    Default("kv-retrieval-heads", "decoder", _kv("kvzip", 32, head_scores=HEAD_SCORES, retrieval_heads=0.5),
            _kv("kvzip", 10_000, head_scores=HEAD_SCORES, retrieval_heads=1.0)),
    # head-level budgets: the retrieval half keeps every token, the other heads a KVzip-scored share of the rest
    Default("kv-whole-retrieval-heads", "decoder",
            _kv("kvzip", 32, head_scores=HEAD_SCORES, retrieval_heads=0.5, other_heads="policy"),
            _kv("kvzip", 10_000, head_scores=HEAD_SCORES, retrieval_heads=0.5, other_heads="policy")),
    # what leaves the cache is kept in an int4 tier (at zero: a budget that holds the sequence needs no tier);
    # KVzip re-reads after a repeat instruction, as the benchmarks run it
    Default("kv-int4-tier", "decoder", _kv("kvzip", 32, tier_bits=4, tier_group=8, tier_read=0.5, reread_prefix=REPEAT),
            _kv("kvzip", 10_000, tier_bits=4, tier_group=8, reread_prefix=REPEAT), exports=False),
    # routers fitted to skip about half the MLP token-work; unfitted, they keep every token
    Default("mlp-skip", "decoder", MLPSkipConfig(target_skip=0.5, fitted=MLP_GATES), MLPSkipConfig(target_skip=0.5)),
    # thresholds fitted to skip half the MLP multiply-adds, inside row-sparse matmuls or before the model's
    # dense ones; unfitted, every channel is kept
    Default("mlp-width", "decoder", MLPWidthConfig(target_skip=0.5, fitted=MLP_WIDTHS),
            MLPWidthConfig(target_skip=0.5)),
    Default("mlp-width-dense-matmuls", "decoder", MLPWidthConfig(target_skip=0.5, fitted=MLP_WIDTHS, row_sparse=False),
            MLPWidthConfig(target_skip=0.5, row_sparse=False)),
    # Token Sparse Attention: each KV head attends among half the tokens (at zero: every token); a model
    # called whole, so an encoder and a DiT (a decoder's cache reads every token: refused)
    Default("sparse-tokens", "encoder", _sparse(token_keep=0.5, window=8), _sparse(token_keep=1.0, window=8),
            exports=False),
    Default("sparse-tokens-dit", "dit", _sparse(token_keep=0.5, window=8), _sparse(token_keep=1.0, window=8),
            exports=False),
    # token density by denoising timestep (FlexDiT / DyDiT): dense at noisy steps, half the tokens late
    Default("merge-timestep", "dit", TokenMergeConfig(timestep_schedule=((0, 0.5), (500, 1.0)), min_tokens=16),
            TokenMergeConfig(timestep_schedule=((0, 1.0),))),
    Default("sparse-dit", "dit", _sparse(keep_ratio=0.5), _sparse(keep_ratio=1.0)),
    Default("exit-draft", "decoder", ExitGateConfig(after_blocks=(0,), mode="draft"),
            ExitGateConfig(after_blocks=(0,), mode="draft"),  # lossless by construction: no zero variant
            exports=False),  # the drafter and the verifier run in torch
    # dKV-Cache: keys and values kept across unmasking steps (at zero sparsity: every token every step)
    Default("delayed-kv", "masked-lm", DelayedKVConfig(refresh_every=4), DelayedKVConfig(refresh_every=1),
            exports=False),  # the caches live across the calls of a sampling loop
    # token caching (RAS): after one full step, half the tokens recomputed per step (at zero: every token)
    Default("token-cache", "dit-sampled", TokenCacheConfig(recompute_ratio=0.5, warmup=0.0, refresh_every=3),
            TokenCacheConfig(recompute_ratio=1.0), exports=False),  # as dKV: the caches live across the steps
]

# every pair of techniques on the same kind of model (one entry per technique)
# (caches: h2o's scores, head groups with KVzip in the other group, and the int4 tier with KVzip's re-read)
PAIRED = {"merge-bipartite", "sparse-encoder", "exit-staged", "sparse-pooled", "sparse-query-aware-decode", "kv-h2o",
          "kv-whole-retrieval-heads", "kv-int4-tier", "exit-draft", "mlp-skip", "merge-timestep", "sparse-dit"}
# query-aware decode reads the top keys on steps narrower than a block, decided on the step's width: a draft
# round's verify step is narrower alone than in a padded batch, so that pair is not yet batch-invariant.
# Self-speculative decoding chooses each round (drafter, length, or a plain step) for the whole batch from
# measured acceptance and timings, and drafts' queries add attention mass to score-based caches: over a
# bounded cache a row's tokens depend on the rounds its batch drafted (the full cache stays batch-invariant;
# with the rounds fixed, bounded caches do too: tests/test_compositions.py)
KNOWN_APART = {("sparse-query-aware-decode", "exit-draft"), ("kv-h2o", "exit-draft"),
               ("kv-whole-retrieval-heads", "exit-draft"), ("kv-int4-tier", "exit-draft")}
PAIRS = [(a, b) for i, a in enumerate(DEFAULTS) for b in DEFAULTS[i + 1:]
         if a.kind == b.kind and type(a.sparse) is not type(b.sparse) and a.id in PAIRED and b.id in PAIRED]
BATCH_INVARIANT_PAIRS = [(a, b) for a, b in PAIRS if (a.id, b.id) not in KNOWN_APART]


NEW_TOKENS = 8  # greedy tokens a decoder entry generates in the cross-technique tests
_models: dict = {}


def ids(entries) -> list[str]:
    """Test ids: an entry's id, or a pair's ids joined by "+"."""
    return [e.id if isinstance(e, Default) else "+".join(x.id for x in e) for e in entries]


def model(kind: str) -> torch.nn.Module:
    """The model of a kind, built once per test session."""
    if kind not in _models:
        _models[kind] = {"encoder": bert, "decoder": llama, "dit": dit, "dit-sampled": dit, "masked-lm": masked_lm}[kind]()
    return _models[kind]


def bert() -> hf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = hf.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB, num_labels=5)
    return hf.BertForSequenceClassification(config).eval()


MASK_ID = VOCAB  # the masked-diffusion model's mask token, after the ordinary ones


def masked_lm() -> hf.BertForMaskedLM:
    torch.manual_seed(0)
    config = hf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB + 1, pad_token_id=None)
    return hf.BertForMaskedLM(config).eval()


def masked_lm_inputs() -> dict:
    """Three prompts of 16 tokens (unmask appends the masked answer)."""
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def llama(layers: int = 2) -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = hf.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=VOCAB)
    return hf.LlamaForCausalLM(config).eval()


def dit() -> torch.nn.Module:
    """diffusers' DiT, 3 blocks over 16x16 latents in patches of 2 (64 tokens), 10 classes."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=3, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                           norm_type="ada_norm_zero").eval()


def dit_inputs() -> dict:
    """Three rows at late timesteps (one band of merge-timestep's schedule, so each row alone runs it too)."""
    generator = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(3, 4, 16, 16, generator=generator), "timestep": torch.tensor([20, 150, 400]),
            "class_labels": torch.tensor([1, 4, 7])}


def encoder_inputs(batch: int = 4, length: int = 48) -> dict:
    """Right-padded rows, as tokenizers pad encoders; long enough for the sparse entries to plan."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, -9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def decoder_prompts(batch: int = 3, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts, as generation pads them."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, :7] = 0
    return ids, mask
