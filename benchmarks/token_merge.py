"""Token merging on a real sentence encoder: throughput, embedding fidelity and retrieval, side by side.

MiniLM (all-MiniLM-L6-v2, pretrained) encodes real paragraphs of Python's help topics the way
sentence-transformers does: sorted by length, batched, truncated. Every merged variant is timed in the
same run as the unmodified model (interleaved by the harness), so the ratio is not a cross-run
comparison. Fidelity is the cosine of each mean-pooled embedding to the original's; retrieval is
recall@1 of "first sentence of a paragraph" queries against the rest of every paragraph.
A ViT built from config gives the image-side speed table (random weights: speed only).

    python -m benchmarks.token_merge [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse import TokenMergeConfig
from dynasparse.harness import zoo
from dynasparse.harness.bench import Case, compare, format_table, write_results
from dynasparse.harness.demo import encoder_merge_config

# the defaults: block 0 dense, inputs of up to 32 tokens whole (short queries stay exact), the hidden state as
# the metric; `dynasparse demo` adds that calls with fewer than 128 tokens beyond those (batch × (length − 32))
# skip merging, whose fixed cost they do not earn back
CANDIDATES = {  # plain ToMe first, then dynasparse settings
    "ToMe: keys, all blocks, keep 0.5": TokenMergeConfig.tome(keep_ratio=0.5),
    "keys, blocks 1-5, keep 0.3, min 48": TokenMergeConfig(keep_ratio=0.3, metric="keys", min_tokens=48),
    "defaults, keep 0.3": TokenMergeConfig(keep_ratio=0.3),
    "defaults, keep 0.2": TokenMergeConfig(keep_ratio=0.2),
    "+ dense below 128 mergeable": encoder_merge_config(0.2),
    "defaults, keep 0.5": TokenMergeConfig(keep_ratio=0.5),
    "first and last blocks dense, keep 0.2": TokenMergeConfig(keep_ratio=0.2, layers=(1, 2, 3, 4)),
}
# every help-topic paragraph of at least this many characters: 577 query/document pairs, enough that
# recall@1 differences of one point are not a handful of near-tied queries
MIN_PARAGRAPH_CHARS = 150


def split_queries(texts: list[str]) -> tuple[list[str], list[str]]:
    """(first sentence, rest of the paragraph) for paragraphs with at least two sentences."""
    queries, docs = [], []
    for text in texts:
        head, sep, rest = text.partition(". ")
        if sep and len(head) > 20 and len(rest) > 100:
            queries.append(head + ".")
            docs.append(rest)
    return queries, docs


def sorted_batches(tokenizer, texts: list[str], batch: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Length-sorted, padded batches (sentence-transformers' encode order)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = []
    for start in range(0, len(order), batch):
        chunk = [texts[i] for i in order[start:start + batch]]
        enc = tokenizer(chunk, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings, in batch order."""
    out = []
    with torch.inference_mode():
        for inputs in batches:
            out.append(zoo.sentence_embeddings(model(**inputs).last_hidden_state, inputs["attention_mask"]))
    return torch.cat(out)


def recall_at_1(model, tokenizer, queries, docs, seq_len: int) -> float:
    q = embed(model, sorted_batches(tokenizer, queries, 64, seq_len))
    d = embed(model, sorted_batches(tokenizer, docs, 64, seq_len))
    # sorted_batches reorders: undo it so row i of q and d belong to paragraph i
    q_order = _order(tokenizer, queries, seq_len)
    d_order = _order(tokenizer, docs, seq_len)
    q = q[torch.argsort(torch.tensor(q_order))]
    d = d[torch.argsort(torch.tensor(d_order))]
    return (q @ d.T).argmax(dim=1).eq(torch.arange(len(queries))).float().mean().item()


def _order(tokenizer, texts, seq_len):
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]]
    return sorted(range(len(texts)), key=lengths.__getitem__)


def minilm_tables(seq_lens, batch_sizes, timed_docs: int, repeats: int, candidates) -> list[str]:
    entry = zoo.load_minilm()
    queries, docs = split_queries(zoo.paragraphs(MIN_PARAGRAPH_CHARS))
    tables = []
    for seq_len in seq_lens:
        example = sorted_batches(entry.tokenizer, docs[:32], 32, seq_len)[-1]
        optimized = {name: dynasparse.optimize(entry.model, [config], example_kwargs=example)
                     for name, config in candidates.items()}
        quality_batches = sorted_batches(entry.tokenizer, docs, 32, seq_len)
        reference = embed(entry.model, quality_batches)
        quality = {"original": {"recall@1": recall_at_1(entry.model, entry.tokenizer, queries, docs, seq_len)}}
        for name, model in optimized.items():
            cosine = (embed(model, quality_batches) * reference).sum(-1)
            quality[name] = {"cos mean": cosine.mean().item(), "cos min": cosine.min().item(),
                             "recall@1": recall_at_1(model, entry.tokenizer, queries, docs, seq_len)}
        for batch in batch_sizes:
            batches = sorted_batches(entry.tokenizer, docs[:timed_docs], batch, seq_len)

            def encode(model, batches=batches):
                return lambda: [model(**b) for b in batches]

            baseline = Case("original", encode(entry.model), quality["original"])
            rows = compare(baseline, [Case(n, encode(m), quality[n]) for n, m in optimized.items()],
                           warmup=1, repeats=repeats)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            title = f"Token merging, MiniLM, seq {seq_len}, batch {batch}"
            meta = {"model": "all-MiniLM-L6-v2 (pretrained)", "text": "pydoc_data.topics paragraphs",
                    "timed": f"{timed_docs} docs, {tokens} real tokens, length-sorted batches",
                    "quality": f"{len(docs)} docs and queries, recall@1 of first sentence → rest of paragraph"}
            write_results(title, rows, name=f"token_merge_minilm_s{seq_len}_b{batch}", meta=meta)
            tables.append(f"### {title}\n\n{format_table(rows)}")
            print(tables[-1], flush=True)
    return tables


def vit_tables(image_sizes, batch: int, repeats: int) -> list[str]:
    import transformers as hf

    tables = []
    for size in image_sizes:
        torch.manual_seed(0)
        model = hf.ViTModel(hf.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                         intermediate_size=1536, image_size=size, patch_size=16)).eval()
        pixels = torch.randn(batch, 3, size, size)
        cases = []
        for name, config in {"r=8 (keys)": TokenMergeConfig.tome(r=8),
                             "keep 0.5 (keys)": TokenMergeConfig.tome(keep_ratio=0.5),
                             "keep 0.35 (keys)": TokenMergeConfig.tome(keep_ratio=0.35)}.items():
            merged = dynasparse.optimize(model, [config], example_kwargs={"pixel_values": pixels})
            cases.append(Case(name, lambda m=merged: m(pixel_values=pixels)))
        rows = compare(Case("original", lambda: model(pixel_values=pixels)), cases, warmup=1, repeats=repeats)
        title = f"Token merging, ViT-S/16 from config, {size}px ({(size // 16) ** 2 + 1} tokens), batch {batch}"
        write_results(title, rows, name=f"token_merge_vit_{size}", meta={"model": "ViT-S/16 built from config"})
        tables.append(f"### {title}\n\n{format_table(rows)}")
        print(tables[-1], flush=True)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--criterion", action="store_true",
                        help="only the acceptance table: seq 256, batch 32, 128 timed docs, 7 repeats")
    args = parser.parse_args()
    if args.criterion:
        minilm_tables([256], [32], timed_docs=128, repeats=7, candidates=CANDIDATES)
        return
    if args.quick:
        minilm_tables([128], [8], timed_docs=16, repeats=2, candidates=dict(list(CANDIDATES.items())[1:2]))
        vit_tables([224], batch=2, repeats=2)
        return
    minilm_tables([256], [32, 8, 1], timed_docs=128, repeats=5, candidates=CANDIDATES)
    minilm_tables([128, 512], [32, 8, 1], timed_docs=128, repeats=3, candidates=dict(list(CANDIDATES.items())[1:5]))
    vit_tables([224, 384], batch=8, repeats=3)


if __name__ == "__main__":
    main()
