"""Long context on the real SmolLM2-135M-Instruct: what each decoder technique keeps, side by side in one run.

* **Fact recall.** ``zoo.FACT`` (a name and a number) planted at ``--depths`` depths of ``--context`` tokens of
  Python's help topics (text the model was not tuned on), asked about in a chat turn; a row recalls when the
  answer's number is in its first new tokens (greedy). Two settings:
  - question-aware: the question ends the prompt, so the last prefill chunk reads it before eviction;
  - question-agnostic: the context is read and compressed first, the question is appended through the
    cache afterwards (kvpress's pipeline), so eviction cannot know what will be asked.
* **Perplexity** of held-out stdlib source (``inspect.py``, never in the help topics): its first half is the
  prompt, the second half is read through the cache 32 tokens per step and scored.

Rows (``--parts cache``): the full cache; each eviction policy at each budget (a share of the sequence);
H2O with the pyramid schedule; query-aware decode; sparse prefill per estimator over the full cache and over
a 25% H2O cache. All depths of a setting run as one left-padded batch (a batched row generates what it
generates alone). A matplotlib plot of recall against budget per policy goes next to the tables.

Rows (``--parts decoding``), on the question-aware prompts, timed against plain greedy in the same run:
self-speculative decoding drafting from the first blocks (acceptance, decode tokens/s, equal to greedy),
also over a 25% H2O cache; per-token exits (blocks per token, agreement with greedy, decode tokens/s).

    python -m benchmarks.long_context [--parts cache decoding] [--context 2048] [--depths 10]
                                      [--budgets 0.5 0.25 0.1] [--only ROW ...]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse import ExitGateConfig, KVEvictionConfig, SparseAttentionConfig
from dynasparse.config import BaseConfig
from dynasparse.harness import zoo
from dynasparse.harness.plot import line_plot
from dynasparse.kernels.kv_cache import POLICIES as CACHE_POLICIES
from dynasparse.runtime.generate import steps_for
from dynasparse.runtime.steps import prefill
from dynasparse.table import table

OUT = Path("benchmarks") / "results"
POLICIES = tuple(name for name in CACHE_POLICIES if name != "full")  # every eviction policy, as registered
NEW_TOKENS = 16  # the number is four digit tokens after "The access code ... is"
DECODE_TOKENS = 48  # decoding rows generate longer, so decode tokens/s is read over more than the answer
READ = 32  # held-out tokens per step after the prompt, for perplexity


def prompts(tokenizer, context: int, depths: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per depth: (chat prompt up to the end of the context, the rest: question and generation prompt)."""
    heads, tails = [], []
    for depth in torch.linspace(0, 1, depths).tolist():
        text = zoo.planted_fact_context(tokenizer, context, depth)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": f"{text}\n\n{zoo.FACT_QUESTION}"}],
                                             add_generation_prompt=True, tokenize=False)
        split = chat.index(zoo.FACT_QUESTION)
        heads.append(tokenizer(chat[:split], add_special_tokens=False).input_ids)
        tails.append(tokenizer(chat[split:], add_special_tokens=False).input_ids)
    return heads, tails


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def recalled(tokenizer, tokens: torch.Tensor) -> list[bool]:
    return [zoo.FACT_ANSWER in tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def question_aware(model, tokenizer, heads, tails, configs: list[BaseConfig]) -> list[bool]:
    ids, mask = left_padded([h + t for h, t in zip(heads, tails)], tokenizer.eos_token_id)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=NEW_TOKENS, configs=configs)
    return recalled(tokenizer, out.sequences[:, ids.shape[1]:])


@torch.no_grad()
def question_agnostic(model, tokenizer, heads, tails, configs: list[BaseConfig]) -> list[bool]:
    """Read the context through the cache, then the question, then decode greedily."""
    ids, mask = left_padded(heads, tokenizer.eos_token_id)
    question = torch.tensor(tails)  # the same question for every row
    step = steps_for(model, configs, ids.shape[0], ids.shape[1] + question.shape[1] + NEW_TOKENS, ids.device,
                     NEW_TOKENS)
    prefill(step, ids, mask, step.config.chunk_size)
    position = mask.sum(-1, keepdim=True)
    offsets = torch.arange(question.shape[1])
    logits = step(question, torch.ones_like(question), position + offsets, last_only=True)[:, -1]
    position = position + question.shape[1]
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(logits.argmax(-1))
        logits = step(tokens[-1][:, None], torch.ones_like(position), position, last_only=True)[:, -1]
        position = position + 1
    return recalled(tokenizer, torch.stack(tokens, 1))


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, configs: list[BaseConfig]) -> float:
    """Perplexity of the second half of ``tokens``, read through the cache after the first half went in as
    the prompt (compressed as the config says), ``READ`` tokens per step: fewer than a sparse block, so the
    steps read as decode steps do (query-aware selection included) and the cache evicts as it goes."""
    length, half = tokens.shape[1], tokens.shape[1] // 2
    step = steps_for(model, configs, 1, length, tokens.device, new_tokens=length - half)
    logits = [prefill(step, tokens[:, :half], torch.ones_like(tokens[:, :half]), step.config.chunk_size)[:, None]]
    for start in range(half, length - 1, READ):
        piece = tokens[:, start:min(start + READ, length - 1)]
        logits.append(step(piece, torch.ones_like(piece), torch.arange(start, start + piece.shape[1])[None]))
    return math.exp(F.cross_entropy(torch.cat(logits, 1)[0].float(), tokens[0, half:]).item())


def settings(budgets: list[float], min_seq_len: int = 1024) -> list[tuple[str, str, float | None, list[BaseConfig]]]:
    """(row name, family for the plot, budget, configs)."""
    rows = [("full cache", "full", 1.0, [])]
    for policy in POLICIES:
        rows += [(f"{policy} {b:.0%}", policy, b, [KVEvictionConfig(policy=policy, budget=b, recent=64)])
                 for b in budgets]
    small = [b for b in budgets if b <= 0.25] or budgets
    for policy in ("h2o", "snapkv"):  # eviction after every prefill chunk: bounded prefill memory
        rows += [(f"{policy} {b:.0%} every chunk", f"{policy} every chunk", b,
                  [KVEvictionConfig(policy=policy, budget=b, recent=64, compress="every_chunk")]) for b in small]
    rows += [(f"h2o pyramid {b:.0%}", "h2o pyramid", b,
              [KVEvictionConfig(policy="h2o", budget=b, recent=64, schedule="pyramid")]) for b in small]
    for b in budgets:  # the cache keeps every token; each decode step reads the share its queries weigh most
        rows.append((f"query-aware decode {b:.0%}", "query-aware decode", b,
                     [SparseAttentionConfig(decode_keep=b, min_seq_len=min_seq_len)]))
    rows.append((f"query-aware decode {budgets[-1]:.0%} + h2o 25%", "query-aware + h2o", None,
                 [SparseAttentionConfig(decode_keep=budgets[-1], min_seq_len=min_seq_len),
                  KVEvictionConfig(policy="h2o", budget=0.25, recent=64)]))
    for estimator in ("pooled", "vertical_slash", "antidiagonal"):
        label = "" if estimator == "pooled" else f" {estimator}"
        for keep in (0.5, 0.25, 0.1):
            sparse = SparseAttentionConfig(keep_ratio=keep, min_seq_len=min_seq_len, estimator=estimator)
            rows.append((f"sparse prefill{label} keep {keep:g}", f"sparse prefill{label}", None, [sparse]))
            if keep < 0.5:
                rows.append((f"sparse prefill{label} keep {keep:g} + h2o 25%", f"sparse{label} + h2o", None,
                             [sparse, KVEvictionConfig(policy="h2o", budget=0.25, recent=64)]))
    return rows


def decoding_settings() -> list[tuple[str, ExitGateConfig | None, list[BaseConfig]]]:
    """(row name, early-exit config, other configs): plain greedy first, the reference of the others."""
    h2o = KVEvictionConfig(policy="h2o", budget=0.25, recent=64)
    rows = [("plain greedy", None, []), ("plain greedy, h2o 25%", None, [h2o])]
    rows += [(f"self-speculative, draft blocks 0..{b - 1}", ExitGateConfig(after_blocks=(b - 1,), mode="draft"), [])
             for b in (8, 12, 16, 20)]
    rows.append(("self-speculative, draft blocks 0..19, h2o 25%", ExitGateConfig(after_blocks=(19,), mode="draft"),
                 [h2o]))
    gates = tuple(range(7, 29, 4))  # after blocks 8, 12, ..., 28 of 30
    rows += [(f"per-token exit, max_prob > {t:g}", ExitGateConfig(after_blocks=gates, threshold=t), [])
             for t in (0.9, 0.99)]
    return rows


def decoding(model, tokenizer, heads, tails) -> tuple[list[list[str]], list[dict]]:
    """Each decoding row on the question-aware batch, beside plain greedy: its speed is the reference of
    every row; its tokens are the reference for the rows over the full cache (plain greedy over the same
    H2O cache for the rows over one)."""
    ids, mask = left_padded([h + t for h, t in zip(heads, tails)], tokenizer.eos_token_id)
    rows, data, reference = [], [], {}
    for name, early_exit, configs in decoding_settings():
        out = dynasparse.generate(model, ids, mask, max_new_tokens=DECODE_TOKENS, configs=configs,
                                  early_exit=early_exit)
        new, stats = out.sequences[:, ids.shape[1]:], out.stats
        key = tuple(type(c).__name__ for c in configs)
        greedy = reference.setdefault(key, (new, stats.decode_tokens_per_second))
        agreement = float((new == greedy[0]).float().mean())
        speed = stats.decode_tokens_per_second
        if early_exit is None:
            detail = "-"
        elif early_exit.mode == "draft":
            detail = f"{stats.acceptance:.0%} accepted"
        else:
            detail = f"{stats.blocks_per_token:.1f} blocks/token"
        aware = recalled(tokenizer, new[:, :NEW_TOKENS])
        data.append({"row": name, "aware": aware, "agreement": agreement, "tokens_per_s": speed,
                     "acceptance": stats.acceptance, "blocks_per_token": stats.blocks_per_token,
                     "prefill_s": stats.prefill_seconds})
        rows.append([name, f"{sum(aware)}/{len(aware)}", detail, f"{agreement:.1%}", f"{speed:.1f}",
                     f"{speed / reference[()][1]:.2f}x"])
        print(rows[-1], flush=True)
    return rows, data


def recall_cell(recalls: list[bool] | str | None) -> str:
    """"hits/count" from a row's per-depth recalls (or the cell itself, as results before 2026-12-04 held)."""
    if recalls is None or isinstance(recalls, str):
        return recalls or "-"
    return f"{sum(recalls)}/{len(recalls)}"


def cache_part(model, tokenizer, heads, tails, held_out, rows_to_run, args) -> str:
    """The cache / prefill table. Rows merge into this context's earlier results (a row run again replaces
    its record), so a subset can be re-run with ``--only`` without losing the rest."""
    path = OUT / f"long_context_{args.context}.json"
    records = {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    for name, _, budget, configs in rows_to_run:
        aware = question_aware(model, tokenizer, heads, tails, configs)
        agnostic = question_agnostic(model, tokenizer, heads, tails, configs) if name in args.agnostic else None
        records[name] = {"row": name, "budget": budget, "aware": aware, "agnostic": agnostic,
                         "perplexity": perplexity(model, held_out, configs)}
        print(records[name], flush=True)
        path.write_text(json.dumps({"title": "(rows so far)", "rows": list(records.values())}, indent=2))
    families = {r[0]: r[1] for r in settings(args.budgets)}  # row name -> plot family, in table order
    order = list(families)
    data = sorted(records.values(), key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    full = records["full cache"]["perplexity"] if "full cache" in records else None
    rows, curves = [], {}
    for record in data:
        ppl = f"{record['perplexity']:.2f}" + (f" ({record['perplexity'] / full - 1:+.1%})" if full else "")
        rows.append([record["row"], recall_cell(record["aware"]), recall_cell(record["agnostic"]), ppl])
        family = families.get(record["row"])
        if record.get("budget") is not None and family is not None:
            hits, count = map(int, recall_cell(record["aware"]).split("/"))
            curves.setdefault(family, []).append((record["budget"], hits / count))
    context_tokens = len(heads[0]) + len(tails[0])
    title = (f"Long context, SmolLM2-135M-Instruct (fp32), 2 CPU cores: a fact at {args.depths} depths of "
             f"~{context_tokens} prompt tokens (help topics), greedy, {NEW_TOKENS} new tokens; perplexity of the second "
             f"half of {held_out.shape[1]} tokens of inspect.py after the first half as the prompt, read {READ} tokens "
             f"per step; budgets are shares of the sequence, sink 4, recent 64, prefill chunks of 512; every policy "
             f"compresses after the prompt unless the row says every chunk; query-aware decode keeps the full cache "
             f"and reads the stated share of keys per step; sparse prefill: keep ratio of blocks past 1024 keys, "
             f"pooled estimator unless the row names another")
    header = ["cache / prefill", "recall, question-aware", "recall, question-agnostic", "perplexity (vs full)"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    if "full" in curves:
        curves["full"] = [(b, curves["full"][0][1]) for b in args.budgets]  # the full cache as a flat reference
        plot = line_plot(OUT / f"long_context_{args.context}.png", curves,
                         xlabel="cache budget (share of the sequence)", ylabel="fact recall (question-aware)",
                         title=f"SmolLM2-135M, {args.context}-token context")
        markdown += f"\n![recall against budget]({plot.name})\n"
    (OUT / f"long_context_{args.context}.md").write_text(markdown)
    path.write_text(json.dumps({"title": title, "rows": data}, indent=2))
    return markdown


def decoding_part(model, tokenizer, heads, tails, args) -> str:
    rows, data = decoding(model, tokenizer, heads, tails)
    context_tokens = len(heads[0]) + len(tails[0])
    title = (f"Decoding on long context, SmolLM2-135M-Instruct (fp32, eager, 2 CPU threads): the question-aware "
             f"fact prompts ({args.depths} depths of ~{context_tokens} tokens) as one batch, {DECODE_TOKENS} new "
             f"greedy tokens; recall from the first {NEW_TOKENS}; tokens against plain greedy over the same cache, "
             f"speed against plain greedy over the full cache, decode steps only")
    header = ["decoding", "recall", "drafts accepted / depth", "tokens equal to greedy", "decode tokens/s (per row)",
              "speedup"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    (OUT / f"long_context_decoding_{args.context}.md").write_text(markdown)
    (OUT / f"long_context_decoding_{args.context}.json").write_text(json.dumps({"title": title, "rows": data},
                                                                               indent=2))
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["cache", "decoding"], default=["cache", "decoding"])
    parser.add_argument("--context", type=int, default=2048, help="tokens of help text around the fact")
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 depths, 3 cache rows")
    parser.add_argument("--agnostic", nargs="*", default=["full cache", "h2o 25%", "snapkv 25%",
                                                            "query-aware decode 10%"],
                        help="rows that also run the question-agnostic setting")
    parser.add_argument("--only", nargs="*", help="run only the cache rows with these names")
    args = parser.parse_args()
    rows_to_run = settings(args.budgets)
    if args.only:
        rows_to_run = [r for r in rows_to_run if r[0] in args.only]
    if args.quick:
        args.context, args.depths, args.budgets = 512, 2, [0.25]
        rows_to_run = [r for r in settings(args.budgets, min_seq_len=128) if r[0] in ("full cache", "h2o 25%",
                                                                     "sparse prefill keep 0.25 + h2o 25%")]
    entry = zoo.load("smollm2")
    model, tokenizer = entry.model, entry.tokenizer
    heads, tails = prompts(tokenizer, args.context, args.depths)
    held_out = tokenizer(inspect.getsource(inspect), return_tensors="pt").input_ids[:, :args.context]
    OUT.mkdir(parents=True, exist_ok=True)
    if "cache" in args.parts:
        print(cache_part(model, tokenizer, heads, tails, held_out, rows_to_run, args))
    if "decoding" in args.parts:
        print(decoding_part(model, tokenizer, heads, tails, args))


if __name__ == "__main__":
    main()
