"""Learned exit gates (JEI-DNN) against threshold rules, side by side in one run, on a real classifier.

The classifier: all-MiniLM-L6-v2 fine-tuned here (cached) to tell which standard-library package a docstring
paragraph comes from (8 packages), with the early-exit loss (every layer's [CLS] through the shared pooler and
classifier), so earlier layers classify too. Paragraphs split 60 / 20 / 20: train, calibration, test.

Each exit rule gets the same calibration split to reach the same quality target (the share of predictions
that may differ from the full model's): ``max_prob`` and ``patience`` (PABEE) choose their threshold on it;
``learned`` gates train on half of it with ``dynasparse.fit`` and choose their threshold on the other half.
On the test split: accuracy, predictions changed, blocks run, and paragraphs/s of the staged runtime against
the Hugging Face model (timed interleaved, median of the repeats). A second table sweeps every rule's threshold on the test split and reports the
fewest blocks each rule needs to hold a given accuracy: the rules compared at equal accuracy.

    python -m benchmarks.learned_exits [--quick]
"""
from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as hf

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from benchmarks.kv_eviction import _save
from dynasparse import ExitGateConfig
from dynasparse.harness.bench import Case, compare
from dynasparse.harness.zoo import minilm_path
from dynasparse.passes.exit_calibration import gate_outcomes, simulate_exits
from dynasparse.table import table

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "unittest", "urllib", "xml")
PER_PACKAGE = 200  # paragraphs per package at most, so the classes are balanced
MAX_TOKENS = 96
CACHE = Path("~/.cache/dynasparse/minilm-stdlib-v1.pt").expanduser()


def paragraphs() -> tuple[list[str], list[int]]:
    """Docstring paragraphs (60+ characters) of the packages' sources, shuffled with a fixed seed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, labels = [], []
    for label, package in enumerate(PACKAGES):
        found = []
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.parts or "tests" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(errors="ignore"))):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node) or ""
                    found += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.strip()) >= 60]
        found = sorted(set(found))
        random.Random(label).shuffle(found)
        texts += found[:PER_PACKAGE]
        labels += [label] * len(found[:PER_PACKAGE])
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def _splits(tokenizer) -> dict[str, tuple[dict, torch.Tensor]]:
    texts, labels = paragraphs()
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    encoded = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(labels)
    n = len(labels)
    cuts = {"train": (0, int(0.6 * n)), "calibration": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
    return {name: ({k: v[a:b] for k, v in encoded.items()}, labels[a:b]) for name, (a, b) in cuts.items()}


def _every_layer_logits(model: hf.BertForSequenceClassification, inputs: dict) -> list[torch.Tensor]:
    hidden = model.bert(**inputs, output_hidden_states=True).hidden_states[1:]
    return [model.classifier(model.bert.pooler(h)) for h in hidden]


def classifier(tokenizer, train: tuple[dict, torch.Tensor], epochs: int = 3) -> hf.BertForSequenceClassification:
    """MiniLM with a package classifier, fine-tuned with the early-exit loss (cached; minutes on 2 cores)."""
    model = hf.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(PACKAGES))
    if CACHE.exists():
        model.load_state_dict(torch.load(CACHE, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    inputs, labels = train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for first in range(0, len(order), 32):
            batch = order[first:first + 32]
            logits = _every_layer_logits(model, {k: v[batch] for k, v in inputs.items()})
            loss = torch.stack([F.cross_entropy(x, labels[batch]) for x in logits]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"MiniLM stdlib classifier epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    return model.eval()


def _batches(inputs: dict, size: int) -> list[dict]:
    count = len(inputs["input_ids"])
    return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, count, size)]


def _optimized(model, config: ExitGateConfig, example: dict, calibration: list[dict]):
    optimized = dynasparse.optimize(model, config, example_kwargs=example,
                                    calibration=calibration if config.calibrates else None)
    if config.criterion == "learned":
        dynasparse.fit(optimized, calibration, held_out=0.5)
    return optimized


def _fewest_blocks(optimized, test: list[dict], labels: torch.Tensor, accuracies: list[float]) -> list[float | None]:
    """For each accuracy, the fewest mean blocks any threshold of this rule reaches while holding it (test split)."""
    plan = optimized.runner.plan
    confidence, predictions, final = gate_outcomes(optimized.graph_module, plan, test)
    grid = torch.quantile(confidence.flatten().double(), torch.linspace(0, 1, 201, dtype=torch.float64))
    points = []
    for threshold in sorted({float(t) for t in grid} | {1.0}):
        answer, blocks, _ = simulate_exits(confidence, predictions, final, plan, [threshold] * len(plan.gates))
        points.append((float((answer == labels).float().mean()), float(blocks.mean())))
    return [min((b for a, b in points if a >= target - 1e-9), default=None) for target in accuracies]


def run(targets: list[float], batch: int, repeats: int) -> str:
    tokenizer = hf.AutoTokenizer.from_pretrained(minilm_path())
    splits = _splits(tokenizer)
    model = classifier(tokenizer, splits["train"])
    (test_inputs, test_y), (calibration_inputs, _) = splits["test"], splits["calibration"]
    test, calibration = _batches(test_inputs, batch), _batches(calibration_inputs, batch)
    example = test[0]
    rules = {"max_prob": {}, "patience": {"patience": 2}, "learned": {}}
    with torch.inference_mode():
        full = torch.cat([model(**b).logits.argmax(-1) for b in test])
    full_accuracy = float((full == test_y).float().mean())
    accuracies = [full_accuracy - drop for drop in (0.0, 0.005, 0.01, 0.02)]
    cases, quality, fewest = [], {}, {}
    for rule, extra in rules.items():
        for target in targets:
            config = ExitGateConfig(criterion=rule, max_quality_drop=target, **extra)
            optimized = _optimized(model, config, example, calibration)
            with torch.inference_mode():
                predictions, blocks = [], []
                for b in test:
                    predictions.append(optimized(**b).logits.argmax(-1))
                    blocks.append(optimized.exit_blocks + 1)
            answer = torch.cat(predictions)
            name = f"{rule}, changed <= {target:.0%} ({optimized.runner.plan.thresholds[0]:.3g})"
            quality[name] = { "accuracy": float((answer == test_y).float().mean()),
                             "changed": float((answer != full).float().mean()),
                             "mean_blocks": float(torch.cat(blocks).float().mean())}
            cases.append(Case(name, lambda o=optimized: [o(**b) for b in test]))
            print(name, quality[name], flush=True)
        with torch.inference_mode():
            fewest[rule] = _fewest_blocks(optimized, test, test_y, accuracies)
    timed = compare(Case("full model (Hugging Face, eager)", lambda: [model(**b) for b in test]), cases,
                    warmup=1, repeats=repeats, measure_memory=False)
    layers = model.config.num_hidden_layers
    rows, data = [], {"full": {"accuracy": full_accuracy, "rows_per_s": len(test_y) / timed[0].median_s}}
    rows.append([timed[0].name, f"{full_accuracy:.2%}", "—", f"{layers:.2f}",
                 f"{len(test_y) / timed[0].median_s:.0f}", "1.00x"])
    for row in timed[1:]:
        q = quality[row.name]
        rows.append([row.name, f"{q['accuracy']:.2%}", f"{q['changed']:.1%}",
                     f"{q['mean_blocks']:.2f}", f"{len(test_y) / row.median_s:.0f}", f"{row.speedup:.2f}x"])
        data[row.name] = {**q, "rows_per_s": len(test_y) / row.median_s, "speedup": row.speedup}
    data["fewest_blocks"] = {"accuracies": accuracies, **fewest}
    title = (f"Learned exit gates vs thresholds: MiniLM (6 layers) fine-tuned to name a docstring paragraph's stdlib "
             f"package ({len(PACKAGES)} classes), {len(test_y)} test paragraphs of {MAX_TOKENS} tokens in batches "
             f"of {batch}, CPU ({torch.get_num_threads()} threads); gates after layers 1..5")
    markdown = f"# {title}\n\n" + table(
        ["exit rule, calibration target (threshold)", "test accuracy", "changed on test", "layers / row",
         "rows/s", "speedup"], rows, markdown=True)
    sweep = [[f"{a:.2%} ({(a - full_accuracy) * 100:+.1f} pts)"] + [
        "—" if fewest[r][i] is None else f"{fewest[r][i]:.2f}" for r in rules] for i, a in enumerate(accuracies)]
    markdown += ("\nAt equal accuracy: the fewest layers per row each rule needs to hold a test accuracy (every "
                 "threshold tried on the test split; '—': none holds it):\n\n"
                 + table(["test accuracy at least"] + list(rules), sweep, markdown=True))
    return _save("learned_exits", markdown, {"title": title, "results": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: one target, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.targets, args.repeats = [0.03], 1
    print(run(args.targets, args.batch, args.repeats), flush=True)


if __name__ == "__main__":
    main()
