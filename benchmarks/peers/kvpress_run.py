"""Run NVIDIA kvpress presses on given token ids, so dynasparse's long-context benchmark can set them beside its own.

kvpress pins its own transformers, so this runs from ``.venv-peers`` (``make peers``) and imports nothing from
dynasparse; the benchmark hands it token ids in a JSON file and reads the rows back:

    .venv-peers/bin/python benchmarks/peers/kvpress_run.py IN.json OUT.json

Every press runs in kvpress's low-level form, ``with press(model): model(ids, past_key_values=DynamicCache())``, on
the ids it is given (no re-tokenising), then decodes greedily with explicit positions, as kvpress's pipeline does
after a compressed prefill. ``compression_ratio`` is kvpress's: the share of the cache REMOVED.

- question_agnostic: only ``context_ids`` are prefilled under the press; ``question_ids`` follow uncompressed.
- question_aware: ``context_ids + question_ids`` are prefilled under the press.

``prefill_s`` runs from the first prompt token to the first generated token's logits (press scoring included);
``decode_tokens_per_s`` counts the one-token steps after it (null when the first token was already end-of-turn).
``kept_tokens`` is what the first decode step attends to, averaged over layers and KV heads: presses that mask
entries instead of dropping them (KVzip, DuoAttention) count the unmasked ones. fp32, CPU; no network: weights
come from the given folder, and a press that wants a download fails into an error row.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import torch  # noqa: E402
from kvpress import (  # noqa: E402
    DuoAttentionPress,
    ExpectedAttentionPress,
    KVzipPress,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
)
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# Each name builds its press for one compression ratio. DuoAttention takes the share of heads turned into streaming
# heads instead (kvpress's own evaluation maps the ratio the same way); SmolLM2 has no published head pattern, so it
# scores heads on the fly, which needs a dataset from the Hub.
PRESSES = {
    "kvzip": lambda ratio: KVzipPress(compression_ratio=ratio),
    "duo_attention": lambda ratio: DuoAttentionPress(head_compression_ratio=ratio, on_the_fly_scoring=True),
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio),
    "expected_attention": lambda ratio: ExpectedAttentionPress(compression_ratio=ratio),
    "observed_attention": lambda ratio: ObservedAttentionPress(compression_ratio=ratio),
    "streaming": lambda ratio: StreamingLLMPress(compression_ratio=ratio),
}

# ObservedAttention scores keys by the attention weights, which only eager attention returns;
# KVzip and DuoAttention refuse eager, so every other press runs on SDPA.
EAGER_PRESSES = {"observed_attention"}

NOTES = {
    "kvzip": "low-level form on the given ids; KVzip reloads the tokenizer from the model folder only to tokenise its "
             "chat-template prefix/suffix and its 'repeat the context' replay prompt; it masks pruned entries and "
             "prunes a different share per layer",
    "duo_attention": "compression_ratio given as head_compression_ratio (share of streaming heads); on-the-fly "
                     "head scoring",
    "observed_attention": "eager attention (scores need the attention weights)",
}


def clear_masks(model) -> None:
    """Forget the masked-key indices a masking press left on the attention modules (eager never resets them)."""
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def kept_tokens(model, cache: DynamicCache) -> int:
    """Cache entries the next step attends to, mean over layers and KV heads (masked entries do not count)."""
    per_layer = []
    for cache_layer, layer in zip(cache.layers, model.model.layers):
        batch, kv_heads, length, _ = cache_layer.keys.shape
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        hidden = 0 if masked is None else len(masked[0]) / (batch * kv_heads)
        per_layer.append(length - hidden)
    return round(sum(per_layer) / len(per_layer))


def greedy(model, cache: DynamicCache, logits: torch.Tensor, position: int, max_new_tokens: int,
           stop_ids: set[int]) -> tuple[list[int], int, float]:
    """Greedy tokens from the prompt's last logits; returns (tokens, decode steps, decode seconds)."""
    tokens = [int(logits[0, -1].argmax())]
    steps, started = 0, time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in stop_ids:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[position + steps]]))
        tokens.append(int(out.logits[0, -1].argmax()))
        steps += 1
    return tokens, steps, time.perf_counter() - started


def run_press(model, press, mode: str, context_ids: list[int], question_ids: list[int], max_new_tokens: int,
              stop_ids: set[int]) -> tuple[list[int], float, float | None, int]:
    """One compressed prefill and greedy decode; returns (tokens, prefill_s, decode tokens/s, kept_tokens)."""
    cache = DynamicCache()
    prompt_len = len(context_ids) + len(question_ids)
    started = time.perf_counter()
    if mode == "question_aware":
        # A press's scoring runs when its context exits (KVzip's replay too): the prompt's own logits come first.
        with press(model):
            logits = model(input_ids=torch.tensor([context_ids + question_ids]), past_key_values=cache,
                           logits_to_keep=1).logits
    elif mode == "question_agnostic":
        with press(model):
            model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
        # The cache is shorter than the positions it holds: give the question its true positions.
        positions = torch.arange(len(context_ids), prompt_len).unsqueeze(0)
        logits = model(input_ids=torch.tensor([question_ids]), past_key_values=cache, position_ids=positions,
                       logits_to_keep=1).logits
    else:
        raise ValueError(f"unknown mode {mode!r}: question_aware or question_agnostic")
    prefill_s = time.perf_counter() - started
    kept = kept_tokens(model, cache)
    tokens, steps, decode_s = greedy(model, cache, logits, prompt_len, max_new_tokens, stop_ids)
    return tokens, prefill_s, (steps / decode_s if steps else None), kept


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def main(in_path: str, out_path: str) -> None:
    hf_logging.disable_progress_bar()  # the one bar to watch is the runs'
    spec = json.loads(open(in_path).read())
    folder, max_new_tokens = spec["model"], int(spec.get("max_new_tokens", 16))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    stop_ids = {i for i in (tokenizer.eos_token_id, model.generation_config.eos_token_id) if isinstance(i, int)}

    with torch.no_grad():  # one plain forward first, so the first row's timings carry no one-time start-up cost
        first = spec["prompts"][0]
        model(input_ids=torch.tensor([first["context_ids"] + first["question_ids"]]), logits_to_keep=1)

    rows = []
    jobs = list(itertools.product(spec["presses"], spec["ratios"], spec["modes"], spec["prompts"]))
    for name, ratio, mode, prompt in tqdm(jobs, desc="kvpress", unit="run"):
        row = {"press": name, "compression_ratio": ratio, "mode": mode, "id": prompt["id"], "generated": None,
               "prefill_s": None, "decode_tokens_per_s": None, "kept_tokens": None, "error": None,
               "note": NOTES.get(name, "low-level form on the given ids")}
        model.set_attn_implementation("eager" if name in EAGER_PRESSES else "sdpa")
        clear_masks(model)
        try:
            press = PRESSES[name](ratio)
            with torch.no_grad():
                tokens, prefill_s, tokens_per_s, kept = run_press(
                    model, press, mode, prompt["context_ids"], prompt["question_ids"], max_new_tokens, stop_ids)
            row.update(generated=tokenizer.decode(tokens, skip_special_tokens=True), prefill_s=prefill_s,
                       decode_tokens_per_s=tokens_per_s, kept_tokens=kept)
        except Exception as error:  # a press that cannot run here still leaves its row, with the reason
            row["error"] = one_line(error)
        rows.append(row)

    key = lambda row: (row["press"], row["compression_ratio"], row["mode"], row["id"])  # noqa: E731
    if os.path.exists(out_path):  # an earlier run's rows stay unless this run measured them again
        ran = {key(row) for row in rows}
        rows = [row for row in json.load(open(out_path))["rows"] if key(row) not in ran] + rows
    result = {"kvpress_version": version("kvpress"), "transformers_version": version("transformers"), "rows": rows}
    with open(out_path, "w") as out:
        json.dump(result, out, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: kvpress_run.py IN.json OUT.json")
    main(sys.argv[1], sys.argv[2])
