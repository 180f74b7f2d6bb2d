"""Exit gates against the full model, side by side in one run: a classifier, and self-speculative decoding.

1. classifier: a ViT trained here (cached) on scikit-learn's bundled handwritten digits, with the early-exit
   loss (every block's [CLS] through the model's own final norm + classifier), so early blocks classify.
   Test accuracy, mean blocks run per image and measured images/s for the full model and for the staged
   runtime at several thresholds (fixed, and calibrated on a held-out split to a quality target);
2. decoder: greedy decoding of the project's byte-level LM trained with the early-exit loss
   (``bytelm`` size ``small-exit``): plain greedy vs self-speculative decoding, its drafter and draft length
   chosen per round (the default) or drafting with each of its first blocks (tokens/s, acceptance, rounds per
   drafter, whether the output equals plain greedy), and vs per-token exits (CALM thresholds, SkipDecode's
   schedule, learned gates of JEI-DNN; tokens/s, blocks per token, share of tokens equal to plain greedy);
   ``--sizes smollm2``: the chooser on SmolLM2, which was not trained for early exit (it must not lose).
   Each size runs at batch 1 and 4 (``--lm-batch``): a verify pass costs more, against a plain step, the
   more rows it reads.

    python benchmarks/early_exit.py [--quick] [--parts classifier decoder]
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
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
from dynasparse.harness import bytelm, zoo
from dynasparse.harness.bench import Case, compare
from dynasparse.table import table

CACHE = Path("~/.cache/dynasparse/vit-digits-v1.pt").expanduser()


def digits_split() -> tuple[torch.Tensor, ...]:
    """sklearn's 1797 8x8 digits (shipped inside the package), scaled to [0, 1]; a fixed split: 70% train,
    10% calibration (thresholds are chosen on images the model has not seen), 20% test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, calibration = order[:int(0.7 * len(labels))], order[int(0.7 * len(labels)):int(0.8 * len(labels))]
    test = order[int(0.8 * len(labels)):]
    return images[train], labels[train], images[calibration], images[test], labels[test]


def _vit() -> hf.ViTForImageClassification:
    torch.manual_seed(0)
    config = hf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=192, num_hidden_layers=8,
                          num_attention_heads=3, intermediate_size=768, num_labels=10, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    return hf.ViTForImageClassification(config)


def _every_block_logits(model: hf.ViTForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    hidden = model.vit(pixel_values=images, output_hidden_states=True).hidden_states[1:]
    return [model.classifier(model.vit.layernorm(h)[:, 0]) for h in hidden]


def digits_classifier(epochs: int = 40) -> hf.ViTForImageClassification:
    """The cached digits ViT, trained first if missing (about a minute on 2 cores)."""
    model = _vit()
    if CACHE.exists():
        model.load_state_dict(torch.load(CACHE, weights_only=True))
        return model.eval()
    train_x, train_y, _, _, _ = digits_split()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(train_y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for first in range(0, len(order), 64):
            batch = order[first:first + 64]
            logits = _every_block_logits(model, train_x[batch])
            loss = torch.stack([F.cross_entropy(x, train_y[batch]) for x in logits]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"digits ViT epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    return model.eval()


def _throughput(run, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Images per second over the test set in batches, the median of ``repeats`` passes."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for first in range(0, len(images), batch):
            run(images[first:first + batch])
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times[1:])


def classifier_part(thresholds: list[float], targets: list[float], batch: int, repeats: int) -> str:
    model = digits_classifier()
    _, _, calibration_x, test_x, test_y = digits_split()
    example = {"pixel_values": test_x[:batch]}
    calibration = [{"pixel_values": calibration_x}]
    settings = [(f"threshold {t}", ExitGateConfig(threshold=t)) for t in thresholds]
    settings += [(f"calibrated: changed <= {q:.1%}", ExitGateConfig(max_quality_drop=q)) for q in targets]
    rows, data = [], {}
    with torch.inference_mode():
        full_accuracy = float((model(pixel_values=test_x).logits.argmax(-1) == test_y).float().mean())
        base = _throughput(lambda x: model(pixel_values=x), test_x, batch, repeats)
        rows.append(["full model (eager)", f"{full_accuracy:.2%}", "8.00", f"{base:.0f}", "1.00x", "—"])
        data["full"] = {"accuracy": full_accuracy, "images_per_s": base}
        for name, config in settings:
            optimized = dynasparse.optimize(model, config, example_kwargs=example,
                                            calibration=calibration if config.calibrates else None)
            predictions, blocks = [], []
            for first in range(0, len(test_x), batch):
                predictions.append(optimized(pixel_values=test_x[first:first + batch]).logits.argmax(-1))
                blocks.append(optimized.exit_blocks + 1)
            accuracy = float((torch.cat(predictions) == test_y).float().mean())
            mean_blocks = float(torch.cat(blocks).float().mean())
            speed = _throughput(lambda x: optimized(pixel_values=x), test_x, batch, repeats)
            threshold = optimized.runner.plan.thresholds[0]
            rows.append([f"{name} ({threshold:.4g})", f"{accuracy:.2%}", f"{mean_blocks:.2f}", f"{speed:.0f}",
                         f"{speed / base:.2f}x", f"{(full_accuracy - accuracy) * 100:+.2f}"])
            data[name] = {"threshold": threshold, "accuracy": accuracy, "mean_blocks": mean_blocks,
                          "images_per_s": speed, "speedup": speed / base, "curve": optimized.runner.plan.curve}
            print(rows[-1], flush=True)
    title = (f"Early exit on the digits ViT (8 blocks, d=192, 17 tokens), {len(test_y)} test images in batches "
             f"of {batch}, CPU ({torch.get_num_threads()} threads); criterion max_prob after every block")
    markdown = f"# {title}\n\n" + table(["model", "test accuracy", "blocks / image", "images/s", "speedup",
                                         "accuracy drop (pts)"], rows, markdown=True)
    curve = optimized.runner.plan.curve
    picked = [curve[i] for i in range(0, len(curve), max(1, len(curve) // 8))] + [curve[-1]]
    markdown += ("\nCalibration trade-off (held-out split; quality = share of predictions that differ from the "
                 "full model's, speed estimated from blocks run):\n\n" + table(
                     ["threshold", "predictions changed", "exit early", "blocks / image", "est. speedup"],
                     [[f"{r['threshold']:.4g}", f"{r['quality_drop']:.1%}", f"{r['exit_share']:.0%}",
                       f"{r['mean_blocks']:.2f}", f"{r['est_speedup']:.2f}x"] for r in picked], markdown=True))
    return _save("early_exit_classifier", markdown, {"title": title, "results": data})


def _generation(name: str, model, prompts: torch.Tensor, new_tokens: int, config: ExitGateConfig | None,
                last: dict) -> Case:
    """A case for ``compare``: one generation, its decode tokens/s as the metric; ``last[name]`` keeps the
    latest output (tokens and stats)."""
    def run() -> dict:
        out = dynasparse.generate(model, prompts, max_new_tokens=new_tokens, early_exit=config)
        last[name] = out
        return {"tokens_per_s": out.stats.new_tokens * prompts.shape[0] / out.stats.decode_seconds}
    return Case(name, run)


def _learned_exits(model, target: float) -> ExitGateConfig:
    """Learned exit gates (JEI-DNN) fitted on training bytes (seconds), the threshold chosen on a held-out
    quarter for ``target`` (the share of next-byte predictions, teacher-forced, the exits may change)."""
    path = CACHE.parent / f"bytelm-small-exit-learned-{target}.safetensors"
    rows = bytelm.encode(bytelm.corpus("train"))[:96 * 128].reshape(96, 128)
    gated = dynasparse.optimize(model, ExitGateConfig(criterion="learned", max_quality_drop=target),
                                example_kwargs={"input_ids": rows[:2]})
    dynasparse.fit(gated, rows, held_out=0.25, save=path)
    return ExitGateConfig(criterion="learned", fitted=str(path))


def _decoder(size: str, batch: int, prompt_len: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A byte LM and ``batch`` held-out byte prompts 4 KB apart, or SmolLM2 (not trained for early exit) and
    ``batch`` stretches of ``inspect.py``'s tokens (not the byte LM's or the fits' texts)."""
    if size == "smollm2":
        entry = zoo.load("smollm2")
        tokens = entry.tokenizer(inspect.getsource(inspect), return_tensors="pt").input_ids[0]
        return entry.model, torch.stack([tokens[i * prompt_len:(i + 1) * prompt_len] for i in range(batch)])
    tokens = bytelm.heldout_tokens(batch * 4096)
    return bytelm.load_or_train(size), torch.stack([tokens[i * 4096:i * 4096 + prompt_len] for i in range(batch)])


def decoder_part(draft_blocks: list[int], thresholds: list[float], batches: list[int], new_tokens: int,
                 prompt_len: int, repeats: int, sizes: list[str], learned_targets: list[float]) -> str:
    """Every size at every batch: a verify pass reads batch x (drafts + 1) tokens, so where a step's cost is
    per-call overhead (batch 1) it costs little more than a plain step, and at larger batches it is compute."""
    rows, data = [], {}
    runs = []  # (size, batch, model, prompts, settings): each model loaded, and its gates fitted, once
    for size in sizes:
        model, every_prompt = _decoder(size, max(batches), prompt_len)  # a smaller batch takes the first rows
        settings = [("drafter and length chosen per round", ExitGateConfig(mode="draft"))]
        settings += [(f"draft with blocks 0..{block}", ExitGateConfig(after_blocks=(block,), mode="draft"))
                     for block in draft_blocks if size != "smollm2"]
        if size == "small-exit":
            settings += [(f"per-token exit, max_prob > {t}", ExitGateConfig(threshold=t)) for t in thresholds]
            settings.append(("SkipDecode schedule 4 → 2 blocks", ExitGateConfig(decode_schedule=(4, 2))))
            settings += [(f"per-token exit, learned gates (changed <= {q:.0%} when fitted)", _learned_exits(model, q))
                         for q in learned_targets]
        runs += [(size, batch, model, every_prompt[:batch], settings) for batch in batches]
    for size, batch, model, prompts, settings in runs:
        last: dict = {}
        cases = [_generation(name, model, prompts, new_tokens, config, last) for name, config in settings]
        timed = compare(_generation("plain greedy", model, prompts, new_tokens, None, last), cases, warmup=1,
                        repeats=repeats, measure_memory=False)
        plain = last["plain greedy"]
        base = timed[0].metrics["tokens_per_s"]
        rows.append([size, batch, "plain greedy", "—", f"{base:.1f}", "1.00x", "—"])
        data[f"{size} batch {batch} plain"] = {"tokens_per_s": base}
        for (name, config), row in zip(settings, timed[1:]):
            out, speed = last[name], row.metrics["tokens_per_s"]
            entry = {"tokens_per_s": speed, "speedup": speed / base}
            if config.mode == "draft":
                same = torch.equal(out.sequences, plain.sequences)
                chosen = ", ".join(f"{what} {n}" for what, n in sorted(out.stats.draft_rounds.items()))
                rows.append([size, batch, f"{name} (rounds: {chosen})", f"{out.stats.acceptance:.0%}",
                             f"{speed:.1f}", f"{speed / base:.2f}x", "yes" if same else "NO"])
                entry.update(acceptance=out.stats.acceptance, equal_to_greedy=same, draft_rounds=out.stats.draft_rounds)
            else:
                same = float((out.sequences == plain.sequences)[:, prompt_len:].float().mean())
                rows.append([size, batch, f"{name} ({out.stats.blocks_per_token:.2f} blocks/token)", "—",
                             f"{speed:.1f}", f"{speed / base:.2f}x", f"{same:.0%} of tokens"])
                entry.update(blocks_per_token=out.stats.blocks_per_token, tokens_equal_to_greedy=same)
            data[f"{size} batch {batch} {name}"] = entry
            print(rows[-1], flush=True)
    title = (f"Self-speculative greedy decoding, byte LM (4 blocks, d=256) or SmolLM2-135M-Instruct, "
             f"{prompt_len}-byte held-out prompts (SmolLM2: {prompt_len} tokens of inspect.py), {new_tokens} new "
             f"bytes or tokens, CPU ({torch.get_num_threads()} threads), median of "
             f"{repeats} runs, every row timed interleaved with the others")
    markdown = f"# {title}\n\n" + table(["model", "batch", "decoding", "drafts accepted", "tokens/s", "speedup",
                                         "equals plain greedy"], rows, markdown=True)
    return _save("early_exit_decoder", markdown, {"title": title, "results": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["classifier", "decoder"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.9, 0.99, 0.999])
    parser.add_argument("--quality-targets", type=float, nargs="+", default=[0.005, 0.01])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-blocks", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--token-thresholds", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--learned-targets", type=float, nargs="+", default=[0.05, 0.2],
                        help="learned per-token exits: the share of predictions fit may let them change")
    parser.add_argument("--lm-batch", type=int, nargs="+", default=[1, 4],
                        help="decoder batches (each size runs at each)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--sizes", nargs="+", default=["small-exit", "small"],
                        choices=["small-exit", "small", "smollm2"],
                        help="byte LMs: small-exit (trained with the early-exit loss), small (not); smollm2: "
                             "SmolLM2-135M-Instruct, prompts of --prompt-len tokens of inspect.py")
    parser.add_argument("--quick", action="store_true", help="smoke run: one threshold, few tokens")
    args = parser.parse_args()
    if args.quick:
        args.thresholds, args.quality_targets, args.repeats = [0.99], [0.01], 1
        args.draft_blocks, args.new_tokens, args.prompt_len = [1], 16, 64
    if "classifier" in args.parts:
        print(classifier_part(args.thresholds, args.quality_targets, args.batch, args.repeats), flush=True)
    if "decoder" in args.parts:
        print(decoder_part(args.draft_blocks, args.token_thresholds, args.lm_batch, args.new_tokens,
                           args.prompt_len, args.repeats, args.sizes, args.learned_targets), flush=True)


if __name__ == "__main__":
    main()
