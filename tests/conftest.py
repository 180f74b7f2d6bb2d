import glob
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not glob.glob("/dev/nvidia[0-9]*"):
    # No GPU: Triton kernels run under Triton's interpreter on CPU tensors. It must be set before
    # anything imports triton (its standard library is decorated at import time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `make test` runs one worker per core: one thread each, no oversubscription

from dynasparse.harness import zoo  # noqa: E402

# Every architecture the foundation promises, plus a hand-written-attention module.
ARCHITECTURES = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny", "bert-tiny", "vit-tiny", "minilm",
                 "examples.handwritten_attention:TinyTransformer"]
EXPECTED_SITES = {"llama-tiny": 2, "qwen2-tiny": 2, "mistral-tiny": 2, "gpt2-tiny": 2, "bert-tiny": 2,
                  "bert-tiny-eager": 2, "llama-tiny-eager": 2, "vit-tiny": 2, "minilm": 6,
                  "examples.handwritten_attention:TinyTransformer": 3}

_cache: dict[str, zoo.ZooModel] = {}


def left_padded_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded as generation pads them (row r has 3r + 1 pads)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :3 * row + 1] = 0
    return ids, mask


def load(name: str) -> zoo.ZooModel:
    """Zoo models are built once per test session."""
    if name not in _cache:
        _cache[name] = zoo.load(name)
    return _cache[name]


def make_inputs(entry: zoo.ZooModel, batch: int, seq_len: int, padded: bool) -> dict:
    inputs = entry.make_inputs(batch, seq_len)
    if "attention_mask" in inputs and not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
