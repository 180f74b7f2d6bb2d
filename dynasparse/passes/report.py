"""The optimization report: what was found, what each pass did, what stayed dense and why."""
from __future__ import annotations

from dataclasses import dataclass, field

from dynasparse.table import table
from dynasparse.ir.analysis import AttentionSite, GraphAnalysis
from dynasparse.registry import PassResult


def _lengths(site: AttentionSite) -> str:
    """Example lengths, starred where the graph keeps the dimension dynamic."""
    star = lambda text: "" if text.isdigit() else "*"  # noqa: E731
    _, q_len, kv_len = site.example_shape
    return f"{q_len}{star(site.q_len)} x {kv_len}{star(site.kv_len)}"


def sites_table(analysis: GraphAnalysis) -> str:
    """One row per attention site: layer, module, heads, head dim, causal, mask, sequence lengths."""
    rows = [[s.index, s.layer, s.module or "-", f"{s.num_heads}/{s.num_kv_heads}", s.head_dim,
             "yes" if s.causal else "no", "yes" if s.has_mask else "no", _lengths(s),
             "block-sparse" if s.sparse else "dense"]
            for s in analysis.sites]
    return table(["site", "layer", "module", "heads q/kv", "head dim", "causal", "mask", "q x kv (*dynamic)",
                   "attention"], rows)


def blocks_table(analysis: GraphAnalysis) -> str:
    rows = [[b.index, b.module, ",".join(map(str, b.sites)), b.input.name if b.input else "-",
             b.output.name if b.output else "-"] for b in analysis.blocks]
    text = table(["block", "module", "sites", "residual in", "residual out"], rows)
    head = ", ".join(analysis.head_modules) or "-"
    return f"{text}\nafter the last block: {head}"


@dataclass
class OptimizationReport:
    model: str
    analysis: GraphAnalysis
    passes: list[PassResult]
    capture_notes: list[str] = field(default_factory=list)
    dense_flops: float = 0.0

    @property
    def flops_saved(self) -> float:
        return sum(p.flops_saved for p in self.passes)

    @property
    def left_dense(self) -> dict[str, str]:
        return {site: why for p in self.passes for site, why in p.left_dense.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "sites": [{"index": s.index, "layer": s.layer, "module": s.module, "heads": s.num_heads,
                       "kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "causal": s.causal}
                      for s in self.analysis.sites],
            "passes": [{"name": p.pass_name, "num_matches": p.num_matches, "applied": p.applied,
                        "left_dense": p.left_dense, "flops_saved": p.flops_saved, "notes": p.notes}
                       for p in self.passes],
            "capture_notes": self.capture_notes,
            "attention_flops_saved_fraction": self.flops_saved / self.dense_flops if self.dense_flops else 0.0,
        }

    def __str__(self) -> str:
        parts = [f"dynasparse optimization report: {self.model}",
                 f"{len(self.analysis.sites)} attention sites, {len(self.analysis.blocks)} blocks", "",
                 sites_table(self.analysis), "",
                 table(["pass", "matches", "left dense"],
                        [[p.pass_name, p.num_matches, len(p.left_dense)] for p in self.passes])]
        applied = [f"  {p.pass_name}: {line}" for p in self.passes for line in p.applied]
        if applied:
            parts += ["", "applied:"] + applied
        if self.left_dense:
            parts += ["", "left dense:"] + [f"  {site}: {why}" for site, why in self.left_dense.items()]
        notes = self.capture_notes + [n for p in self.passes for n in p.notes]
        if notes:
            parts += ["", "notes:"] + [f"  {n}" for n in notes]
        share = self.flops_saved / self.dense_flops if self.dense_flops else 0.0
        parts += ["", f"estimated attention FLOPs saved at the example shape: {share:.1%}"]
        return "\n".join(parts)
