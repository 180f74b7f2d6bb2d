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
import dataclasses
import inspect
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
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
from dynasparse.kernels.policies import POLICIES as CACHE_POLICIES
from dynasparse.passes.retrieval_heads import cached_head_scores
from dynasparse.runtime.generate import steps_for
from dynasparse.runtime.steps import prefill
from dynasparse.table import table

OUT = Path("benchmarks") / "results"
POLICIES = tuple(name for name in CACHE_POLICIES if name != "full")  # every eviction policy, as registered
NEW_TOKENS = 16  # the number is four digit tokens after "The access code ... is"
DECODE_TOKENS = 48  # decoding rows generate longer, so decode tokens/s is read over more than the answer
READ = 32  # held-out tokens per step after the prompt, for perplexity


KEYS = ("Amber", "Cobalt", "Saffron", "Indigo")  # the multi-key task plants one passcode per key
ASKED = "Cobalt"
MULTIKEY_QUESTION = f"What is the passcode of the {ASKED} account?"


@dataclass
class Task:
    """One prompt family: per sample, the chat prompt up to the end of the context (``heads``), the rest
    (question and generation prompt, the same for every sample: ``tails``), and the answer to find."""

    name: str
    heads: list[list[int]]
    tails: list[list[int]]
    answers: list[str]


def _chat_split(tokenizer, text: str, question: str) -> tuple[list[int], list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": f"{text}\n\n{question}"}],
                                         add_generation_prompt=True, tokenize=False)
    split = chat.index(question)
    return (tokenizer(chat[:split], add_special_tokens=False).input_ids,
            tokenizer(chat[split:], add_special_tokens=False).input_ids)


def fact_task(tokenizer, context: int, depths: int) -> Task:
    """``zoo.FACT`` (one name and number, said once) at ``depths`` evenly spaced depths."""
    pairs = [_chat_split(tokenizer, zoo.planted_fact_context(tokenizer, context, depth), zoo.FACT_QUESTION)
             for depth in torch.linspace(0, 1, depths).tolist()]
    return Task("fact", [h for h, _ in pairs], [t for _, t in pairs], [zoo.FACT_ANSWER] * depths)


def multikey_task(tokenizer, context: int, samples: int) -> Task:
    """RULER's multi-key needle: four accounts each get a 5-digit passcode, planted at four depths a quarter
    apart; the question asks one of them (``ASKED``, at a depth that moves across samples), so the cache
    must keep the right number among three look-alikes."""
    generator = torch.Generator().manual_seed(25)
    paragraphs = []
    count = 0
    for paragraph in zoo.paragraphs():
        count += len(tokenizer(paragraph).input_ids)
        if count > context:
            break
        paragraphs.append(paragraph)
    heads, tails, answers = [], [], []
    for depth in torch.linspace(0, 1, samples).tolist():
        codes = [str(c) for c in torch.randint(10000, 100000, (len(KEYS),), generator=generator).tolist()]
        asked = KEYS.index(ASKED)
        planted = sorted(((depth + (i - asked) / len(KEYS)) % 1.0, f"The passcode of the {key} account is {code}.")
                         for i, (key, code) in enumerate(zip(KEYS, codes)))
        kept = list(paragraphs)
        for at, fact in reversed(planted):  # deepest first, so earlier insertions do not shift later ones
            kept.insert(round(len(paragraphs) * at), fact)
        head, tail = _chat_split(tokenizer, "\n\n".join(kept), MULTIKEY_QUESTION)
        heads.append(head)
        tails.append(tail)
        answers.append(codes[asked])
    return Task("multikey", heads, tails, answers)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def recalled(tokenizer, tokens: torch.Tensor, answers: list[str]) -> list[bool]:
    return [answer in tokenizer.decode(row, skip_special_tokens=True) for row, answer in zip(tokens, answers)]


def question_aware(model, tokenizer, task: Task, configs: list[BaseConfig]) -> tuple[list[bool], dict]:
    """Recall per sample, and what the run cost: every byte the cache held while decoding as a share of
    the full cache's K/V (in the model's dtype, and against a bf16 full cache), prefill seconds (scoring
    passes included), decode tokens/s per row."""
    ids, mask = left_padded([h + t for h, t in zip(task.heads, task.tails)], tokenizer.eos_token_id)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=NEW_TOKENS, configs=configs)
    stats = out.stats
    bf16_full = stats.cache_full_bytes * 2 / next(model.parameters()).element_size()
    cost = {"bytes_share": stats.cache_allocated_bytes / stats.cache_full_bytes,
            "bytes_share_bf16": stats.cache_allocated_bytes / bf16_full,
            "prefill_s": stats.prefill_seconds, "decode_tokens_per_s": stats.decode_tokens_per_second}
    return recalled(tokenizer, out.sequences[:, ids.shape[1]:], task.answers), cost


@torch.no_grad()
def question_agnostic(model, tokenizer, task: Task, configs: list[BaseConfig]) -> list[bool]:
    """Read the context through the cache, then the question, then decode greedily."""
    ids, mask = left_padded(task.heads, tokenizer.eos_token_id)
    question = torch.tensor(task.tails)  # the same question for every row
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
    return recalled(tokenizer, torch.stack(tokens, 1), task.answers)


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


def settings(budgets: list[float], min_seq_len: int = 1024, head_scores: str | None = None,
             repeat: tuple[int, ...] = ()) -> list[tuple[str, str, float | None, list[BaseConfig]]]:
    """(row name, family for the plot, budget, configs). ``head_scores``: SmolLM2's retrieval-head scores
    (calibrated on stdlib docstrings, not on these texts), for the head-group rows. ``repeat``: KVzip's repeat
    instruction (``dynasparse.repeat_prompt``), for the rows that re-read after it."""
    rows = [("full cache", "full", 1.0, [])]
    for policy in POLICIES:
        rows += [(f"{policy} {b:.0%}", policy, b, [KVEvictionConfig(policy=policy, budget=b, recent=64)])
                 for b in budgets]
    for policy in POLICIES:  # the same budgets in bytes: every byte the bounded cache holds counts
        rows += [(f"{policy} {b:.0%} of bytes", f"{policy} (bytes)", b,
                  [KVEvictionConfig(policy=policy, budget=b, recent=64, unit="bytes")]) for b in budgets]
    for share in (0.25, 0.1) if head_scores else ():  # retrieval heads keep a KVzip budget, others sinks + recent
        rows += [(f"retrieval heads {share:.0%} + kvzip {b:.0%} of bytes", f"retrieval heads {share:.0%} + kvzip", b,
                  [KVEvictionConfig(policy="kvzip", budget=b, recent=64, unit="bytes", head_scores=head_scores,
                                    retrieval_heads=share)]) for b in budgets]
    # what leaves the cache is kept quantized; the tier keeps what was read lately, so 16 recent tokens in
    # full precision do (a 64-token window costs a fifth of a 10% budget at 2k)
    for policy, bits in (("kvzip", 4), ("kvzip", 2), ("snapkv", 4)):
        rows += [(f"{policy} {b:.0%} of bytes + int{bits} tier, recent 16", f"{policy} + int{bits} tier", b,
                  [KVEvictionConfig(policy=policy, budget=b, recent=16, unit="bytes", tier_bits=bits)])
                 for b in budgets]
    if repeat:
        rows += [(f"kvzip {b:.0%} of bytes + int4 tier, recent 16, repeat prompt", "kvzip + int4 tier + repeat", b,
                  [KVEvictionConfig(policy="kvzip", budget=b, recent=16, unit="bytes", tier_bits=4,
                                    reread_prefix=repeat)]) for b in budgets]
    for share in (0.25, 0.1) if repeat and head_scores else ():  # the calibrated retrieval heads keep every token
        rows += [(f"retrieval heads {share:.0%} whole + kvzip {b:.0%} of bytes + int4 tier, recent 16, repeat prompt",
                  f"retrieval heads {share:.0%} whole + kvzip + int4 + repeat", b,
                  [KVEvictionConfig(policy="kvzip", budget=b, recent=16, unit="bytes", tier_bits=4,
                                    reread_prefix=repeat, head_scores=head_scores, retrieval_heads=share,
                                    other_heads="policy")]) for b in budgets]
    rows += [(f"kvzip {b:.0%} of bytes + int4 tier, recent 16, read 25%", "kvzip + int4 tier, read 25%", b,
              [KVEvictionConfig(policy="kvzip", budget=b, recent=16, unit="bytes", tier_bits=4, tier_read=0.25)])
             for b in budgets]
    if head_scores:
        rows += [(f"retrieval heads 25% + kvzip {b:.0%} of bytes + int4 tier", "retrieval heads 25% + kvzip + int4",
                  b, [KVEvictionConfig(policy="kvzip", budget=b, recent=64, unit="bytes", head_scores=head_scores,
                                       retrieval_heads=0.25, tier_bits=4)]) for b in budgets]
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
    rows += [("self-speculative, drafter and length chosen per round", ExitGateConfig(mode="draft"), []),
             ("self-speculative, chosen per round, h2o 25%", ExitGateConfig(mode="draft"), [h2o])]
    # one drafter each (the choice of length and of plain steps still runs): what a fixed LayerSkip exit gets
    rows += [(f"self-speculative, draft blocks 0..{b - 1}", ExitGateConfig(after_blocks=(b - 1,), mode="draft"), [])
             for b in (8, 12, 16, 20)]
    gates = tuple(range(7, 29, 4))  # after blocks 8, 12, ..., 28 of 30
    rows += [(f"per-token exit, max_prob > {t:g}", ExitGateConfig(after_blocks=gates, threshold=t), [])
             for t in (0.9, 0.99)]
    return rows


def decoding(model, tokenizer, task: Task, new_tokens: int, only: list[str] | None
             ) -> tuple[list[list[str]], list[dict]]:
    """Each decoding row on the question-aware batch, beside plain greedy: its speed is the reference of
    every row; its tokens are the reference for the rows over the full cache (plain greedy over the same
    H2O cache for the rows over one). ``only``: the rows to run besides the plain ones."""
    ids, mask = left_padded([h + t for h, t in zip(task.heads, task.tails)], tokenizer.eos_token_id)
    rows, data, reference = [], [], {}
    for name, early_exit, configs in decoding_settings():
        if only is not None and early_exit is not None and name not in only:
            continue
        out = dynasparse.generate(model, ids, mask, max_new_tokens=new_tokens, configs=configs,
                                  early_exit=early_exit)
        new, stats = out.sequences[:, ids.shape[1]:], out.stats
        key = tuple(type(c).__name__ for c in configs)
        greedy = reference.setdefault(key, (new, stats.decode_tokens_per_second))
        agreement = float((new == greedy[0]).float().mean())
        speed = stats.decode_tokens_per_second
        if early_exit is None:
            detail = "-"
        elif early_exit.mode == "draft":
            detail = f"{stats.acceptance:.0%} accepted; rounds: " + ", ".join(
                f"{what} {n}" for what, n in sorted(stats.draft_rounds.items()))
        else:
            detail = f"{stats.blocks_per_token:.1f} blocks/token"
        aware = recalled(tokenizer, new[:, :NEW_TOKENS], task.answers)
        data.append({"row": name, "aware": aware, "agreement": agreement, "tokens_per_s": speed,
                     "acceptance": stats.acceptance, "blocks_per_token": stats.blocks_per_token,
                     "draft_rounds": stats.draft_rounds, "prefill_s": stats.prefill_seconds})
        rows.append([name, f"{sum(aware)}/{len(aware)}", detail, f"{agreement:.1%}", f"{speed:.1f}",
                     f"{speed / reference[()][1]:.2f}x"])
        print(rows[-1], flush=True)
    return rows, data


PEERS_PYTHON = Path(".venv-peers") / "bin" / "python"  # `make peers`: kvpress pins its own transformers
PRESSES = ("kvzip", "duo_attention", "snapkv", "expected_attention", "observed_attention", "streaming")
MASKING = ("kvzip", "duo_attention")  # kvpress hides these presses' pruned entries: the full K/V stays allocated


def run_kvpress(task: Task, args) -> None:
    """kvpress's presses on this task's token ids, at the run's budgets, both settings, run by
    ``benchmarks/peers/kvpress_run.py`` in kvpress's own venv (its rows land in ``*_kvpress.json``)."""
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"--peers needs kvpress's venv: run `make peers` first ({PEERS_PYTHON} is missing)")
    job = {"model": str(zoo.smollm2_folder()), "max_new_tokens": NEW_TOKENS, "presses": args.peers or list(PRESSES),
           "ratios": [round(1 - b, 4) for b in args.budgets], "modes": args.peer_settings,
           "prompts": [{"id": str(i), "context_ids": h, "question_ids": t}
                       for i, (h, t) in enumerate(zip(task.heads, task.tails))]}
    job_path = OUT / f"{results_name(task, args.context)}_kvpress_job.json"
    out_path = OUT / f"{results_name(task, args.context)}_kvpress.json"
    earlier = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    job_path.write_text(json.dumps(job))
    subprocess.run([str(PEERS_PYTHON), "benchmarks/peers/kvpress_run.py", str(job_path), str(out_path)], check=True)
    job_path.unlink()
    result = json.loads(out_path.read_text())  # rows of other budgets or presses from earlier runs stay

    def key(row: dict) -> tuple:
        return row["press"], row["compression_ratio"], row["mode"], row["id"]

    ran = {key(row) for row in result["rows"]}
    result["rows"] = [row for row in earlier if key(row) not in ran] + result["rows"]
    out_path.write_text(json.dumps(result, indent=2))


def kvpress_rows(task: Task, context: int) -> list[dict]:
    """The kvpress run's rows for this task as table records, one per (press, budget); none before a run."""
    out_path = OUT / f"{results_name(task, context)}_kvpress.json"
    if not out_path.exists():
        return []
    records: dict[tuple, dict] = {}
    for row in json.loads(out_path.read_text())["rows"]:
        share = round(1 - row["compression_ratio"], 4)
        record = records.setdefault((row["press"], share), {
            "row": f"kvpress {row['press']} {share:.0%}", "budget": share, "aware": [], "agnostic": [],
            "perplexity": None, "errors": [], "prefill": {}, "decode": {}})
        if row.get("error"):
            record["errors"].append(row["error"])
            continue
        hit = task.answers[int(row["id"])] in row["generated"]
        setting = "aware" if row["mode"] == "question_aware" else "agnostic"
        record[setting].append(hit)
        record["prefill"].setdefault(setting, []).append(row["prefill_s"])
        record["decode"].setdefault(setting, []).append(row["decode_tokens_per_s"])
    for record in records.values():
        errors, prefill, decode = record.pop("errors"), record.pop("prefill"), record.pop("decode")
        setting = "aware" if "aware" in prefill else "agnostic"  # costs of the question-aware run where it ran
        prefill_s, decode = prefill.get(setting), decode.get(setting)
        record["aware"], record["agnostic"] = record["aware"] or None, record["agnostic"] or None
        if errors:
            record["aware"] = record["agnostic"] = f"error: {errors[0]}"
        elif prefill_s:  # one prompt at a time; the kept share of K/V (kvpress holds no scores), or all of it
            held = 1.0 if record["row"].split()[1] in MASKING else record["budget"]
            record.update(bytes_share=held, bytes_share_bf16=held * 2,  # fp32 K/V over a bf16 full cache
                          prefill_s=sum(prefill_s), decode_tokens_per_s=sum(decode) / len(decode))
    return list(records.values())


def recall_cell(recalls: list[bool] | str | None) -> str:
    """"hits/count" from a row's per-depth recalls (or the cell itself, as results before 2026-12-04 held)."""
    if recalls is None or isinstance(recalls, str):
        return recalls or "-"
    return f"{sum(recalls)}/{len(recalls)}"


def results_name(task: Task, context: int) -> str:
    return f"long_context_{context}" + ("" if task.name == "fact" else f"_{task.name}")


def cache_part(model, tokenizer, task: Task, held_out, rows_to_run, args) -> str:
    """The cache / prefill table. Rows merge into this context's earlier results (a row run again replaces
    its record), so a subset can be re-run with ``--only`` without losing the rest."""
    path = OUT / f"{results_name(task, args.context)}.json"

    def on_disk() -> dict[str, dict]:  # re-read before each write: another run may have added rows meanwhile
        return {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}

    ran: dict[str, dict] = {}
    for name, _, budget, configs in rows_to_run:
        aware, cost = question_aware(model, tokenizer, task, configs)
        agnostic = (question_agnostic(model, tokenizer, task, configs) if args.all_agnostic or name in args.agnostic
                    else None)
        ran[name] = {"row": name, "budget": budget, "aware": aware, "agnostic": agnostic,
                     "perplexity": None if args.no_perplexity else perplexity(model, held_out, configs), **cost}
        print(ran[name], flush=True)
        path.write_text(json.dumps({"title": "(rows so far)", "rows": list((on_disk() | ran).values())}, indent=2))
    if args.peers is not None:
        run_kvpress(task, args)
    records = on_disk() | ran | {r["row"]: r for r in kvpress_rows(task, args.context)}
    families = {r[0]: r[1] for r in settings(args.budgets, head_scores=args.head_scores, repeat=args.repeat)}  # row name -> plot family, in table order
    order = list(families)
    data = sorted(records.values(), key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    full = records["full cache"].get("perplexity") if "full cache" in records else None
    rows, curves = [], {}
    for record in data:
        ppl = "-" if record.get("perplexity") is None else (
            f"{record['perplexity']:.2f}" + (f" ({record['perplexity'] / full - 1:+.1%})" if full else ""))
        cost = ["-"] * 3
        if "bytes_share" in record:
            cost = [f"{record['bytes_share']:.1%} ({record['bytes_share_bf16']:.0%})", f"{record['prefill_s']:.1f}",
                    f"{record['decode_tokens_per_s']:.1f}"]
        rows.append([record["row"], recall_cell(record["aware"]), recall_cell(record["agnostic"]), ppl, *cost])
        family = families.get(record["row"])
        if record.get("budget") is not None and family is not None:
            hits, count = map(int, recall_cell(record["aware"]).split("/"))
            curves.setdefault(family, []).append((record["budget"], hits / count))
    context_tokens = len(task.heads[0]) + len(task.tails[0])
    asked = ("a fact at" if task.name == "fact" else
             f"four passcodes planted a quarter apart, the {ASKED} one asked, its depth moving over")
    title = (f"Long context, SmolLM2-135M-Instruct (fp32), 2 CPU cores: {asked} {args.depths} depths of "
             f"~{context_tokens} prompt tokens (help topics), greedy, {NEW_TOKENS} new tokens; perplexity of the second "
             f"half of {held_out.shape[1]} tokens of inspect.py after the first half as the prompt, read {READ} tokens "
             f"per step; budgets are shares of the sequence, sink 4, recent 64, prefill chunks of 512; every policy "
             f"compresses after the prompt unless the row says every chunk; query-aware decode keeps the full cache "
             f"and reads the stated share of keys per step; sparse prefill: keep ratio of blocks past 1024 keys, "
             f"pooled estimator unless the row names another; bytes: every byte the cache holds while decoding "
             f"(K/V, positions, scores) over the full cache's K/V in fp32 (in brackets: over a bf16 full cache); "
             f"prefill s and decode tokens/s (per row) from the question-aware batch; kvpress rows run its presses "
             f"on the same token ids from .venv-peers (compression_ratio = 1 - the share kept)")
    header = ["cache / prefill", "recall, question-aware", "recall, question-agnostic", "perplexity (vs full)",
              "bytes held (vs bf16)", "prefill s", "decode tokens/s"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    if "full" in curves:
        curves["full"] = [(b, curves["full"][0][1]) for b in args.budgets]  # the full cache as a flat reference
        plot = line_plot(OUT / f"{results_name(task, args.context)}.png", curves,
                         xlabel="cache budget (share of the sequence)", ylabel="fact recall (question-aware)",
                         title=f"SmolLM2-135M, {args.context}-token context")
        markdown += f"\n![recall against budget]({plot.name})\n"
    (OUT / f"{results_name(task, args.context)}.md").write_text(markdown)
    path.write_text(json.dumps({"title": title, "rows": data}, indent=2))
    return markdown


def decoding_part(model, tokenizer, task: Task, args) -> str:
    rows, data = decoding(model, tokenizer, task, args.decode_tokens, args.only)
    context_tokens = len(task.heads[0]) + len(task.tails[0])
    title = (f"Decoding on long context, SmolLM2-135M-Instruct (fp32, eager, 2 CPU threads): the question-aware "
             f"fact prompts ({args.depths} depths of ~{context_tokens} tokens) as one batch, {args.decode_tokens} new "
             f"greedy tokens; recall from the first {NEW_TOKENS}; tokens against plain greedy over the same cache, "
             f"speed against plain greedy over the full cache, decode steps only")
    header = ["decoding", "recall", "drafts accepted / depth", "tokens equal to greedy", "decode tokens/s (per row)",
              "speedup"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    name = f"long_context_decoding_{args.context}" + ("" if args.decode_tokens == DECODE_TOKENS
                                                       else f"_{args.decode_tokens}")
    (OUT / f"{name}.md").write_text(markdown)
    (OUT / f"{name}.json").write_text(json.dumps({"title": title, "rows": data}, indent=2))
    return markdown


RECIPE_TOKENS = 128  # new tokens of the end-to-end row


@torch.no_grad()
def recipe_part(model, tokenizer, args) -> str:
    """The long-context recipe end to end on one 8k prompt (the fact planted mid-way, question-aware), beside
    Hugging Face ``generate`` in the same run: the bytes-bounded cache (KVzip at 25% of the bytes with an int4
    tier) alone and after sparse prefill at the setting that held quality (antidiagonal estimator,
    ``mass=0.95``), with ``compile=True``, beside dynasparse's full cache compiled (a first generation compiles
    the graphs and is not timed)."""
    from dynasparse.harness.bench import hf_generate_timed

    task = fact_task(tokenizer, args.recipe_context, 3)
    ids = torch.tensor([task.heads[1] + task.tails[1]])
    mask = torch.ones_like(ids)
    sparse = SparseAttentionConfig(estimator="antidiagonal", mass=0.95, min_seq_len=1024)
    bounded = KVEvictionConfig(policy="kvzip", budget=0.25, recent=16, unit="bytes", tier_bits=4,
                               reread_prefix=dynasparse.repeat_prompt(tokenizer))
    runs = [("dynasparse: full cache, compiled", []),
            ("dynasparse: kvzip 25% of bytes (repeat prompt) + int4 tier, compiled", [bounded]),
            ("dynasparse: the same, each step reading 25% of the tier's blocks",
             [dataclasses.replace(bounded, tier_read=0.25)]),
            ("dynasparse: sparse prefill (antidiagonal, mass 0.95) + kvzip 25% of bytes (repeat prompt) + int4 tier, "
             "compiled",
             [sparse, bounded]),
            ("dynasparse: sparse prefill + the same, each step reading 25% of the tier's blocks",
             [sparse, dataclasses.replace(bounded, tier_read=0.25)])]
    rows, data = [], []
    start = time.perf_counter()
    new, hf = hf_generate_timed(model, ids, mask, RECIPE_TOKENS, pad_token_id=tokenizer.eos_token_id)
    total = time.perf_counter() - start
    full_bytes = hf["cache MiB"] * 2**20
    hit = recalled(tokenizer, new[:, :NEW_TOKENS], task.answers[1:2])[0]
    data.append({"row": "Hugging Face generate (DynamicCache)", "total_s": total, "prefill_s": hf["prefill ms"] / 1e3,
                 "decode_tokens_per_s": hf["decode tok/s"], "cache_bytes": full_bytes, "recalled": hit})
    for name, configs in runs:
        dynasparse.generate(model, ids[:, :1100], max_new_tokens=4, configs=configs, compile=True)  # compile once
        start = time.perf_counter()
        out = dynasparse.generate(model, ids, mask, max_new_tokens=RECIPE_TOKENS, configs=configs, compile=True)
        total = time.perf_counter() - start
        stats = out.stats
        hit = recalled(tokenizer, out.sequences[:, ids.shape[1]:][:, :NEW_TOKENS], task.answers[1:2])[0]
        data.append({"row": name, "total_s": total, "prefill_s": stats.prefill_seconds,
                     "decode_tokens_per_s": stats.decode_tokens_per_second,
                     "cache_bytes": stats.cache_allocated_bytes, "recalled": hit})
    for record in data:
        rows.append([record["row"], f"{record['total_s']:.1f}", f"{record['prefill_s']:.1f}",
                     f"{record['decode_tokens_per_s']:.1f}",
                     f"{record['cache_bytes'] / 2**20:.1f} ({record['cache_bytes'] / full_bytes:.0%})",
                     "yes" if record["recalled"] else "no"])
        print(rows[-1], flush=True)
    title = (f"The long-context recipe, SmolLM2-135M-Instruct (fp32), 2 CPU cores: one {ids.shape[1]}-token prompt "
             f"(the fact mid-way, the question at the end), {RECIPE_TOKENS} greedy new tokens, batch 1; cache MiB: "
             f"every byte held while decoding (share of Hugging Face's full cache)")
    header = ["run", "total s", "prefill s", "decode tokens/s", "cache MiB (share)", "answer recalled"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    (OUT / f"long_context_recipe_{args.recipe_context}.md").write_text(markdown)
    (OUT / f"long_context_recipe_{args.recipe_context}.json").write_text(json.dumps({"title": title, "rows": data},
                                                                                   indent=2))
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["cache", "decoding", "recipe"], default=["cache", "decoding"])
    parser.add_argument("--recipe-context", type=int, default=8192, help="tokens of help text in the recipe row")
    parser.add_argument("--context", type=int, default=2048, help="tokens of help text around the fact")
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 depths, 3 cache rows")
    parser.add_argument("--agnostic", nargs="*", default=["full cache", "h2o 25%", "snapkv 25%",
                                                            "query-aware decode 10%"],
                        help="rows that also run the question-agnostic setting")
    parser.add_argument("--only", nargs="*", help="run only the rows with these names (plain decoding rows, "
                                                  "the references of the decoding part, always run)")
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, help="new tokens of the decoding rows")
    parser.add_argument("--task", choices=["fact", "multikey"], default="fact",
                        help="fact: one fact said once; multikey: four passcodes, one asked")
    parser.add_argument("--all-agnostic", action="store_true", help="every row also runs question-agnostic")
    parser.add_argument("--no-perplexity", action="store_true",
                        help="skip perplexity (it reads inspect.py whatever the task: one task's run gives it)")
    parser.add_argument("--peers", nargs="*", default=None, metavar="PRESS",
                        help=f"also run kvpress's presses on the same prompts from {PEERS_PYTHON} "
                             f"(no names: {' '.join(PRESSES)})")
    parser.add_argument("--peer-settings", nargs="+", choices=["question_aware", "question_agnostic"],
                        default=["question_aware", "question_agnostic"],
                        help="the settings kvpress's presses run in (KVzipPress takes minutes per 4k prompt)")
    args = parser.parse_args()
    entry = zoo.load("smollm2")
    model, tokenizer = entry.model, entry.tokenizer
    args.head_scores = str(cached_head_scores(model, tokenizer, zoo.cache_dir() / "smollm2"))
    args.repeat = dynasparse.repeat_prompt(tokenizer)
    rows_to_run = settings(args.budgets, head_scores=args.head_scores, repeat=args.repeat)
    if args.only is not None:
        rows_to_run = [r for r in rows_to_run if r[0] in args.only]
    if args.quick:
        args.context, args.depths, args.budgets = 512, 2, [0.25]
        rows_to_run = [r for r in settings(args.budgets, 128, args.head_scores, args.repeat)
                       if r[0] in ("full cache", "h2o 25%", "sparse prefill keep 0.25 + h2o 25%")]
    task = (fact_task if args.task == "fact" else multikey_task)(tokenizer, args.context, args.depths)
    held_out = tokenizer(inspect.getsource(inspect), return_tensors="pt").input_ids[:, :args.context]
    OUT.mkdir(parents=True, exist_ok=True)
    if "cache" in args.parts:
        print(cache_part(model, tokenizer, task, held_out, rows_to_run, args))
    if "decoding" in args.parts:
        print(decoding_part(model, tokenizer, task, args))
    if "recipe" in args.parts:
        print(recipe_part(model, tokenizer, args))


if __name__ == "__main__":
    main()
