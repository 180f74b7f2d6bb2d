"""The pipeline: canonicalize, then each configured pass in stage order, verifying the graph after every step.

Set ``DYNASPARSE_DUMP_GRAPHS=<dir>`` to write the graph after each pass as ``NN_<pass>.txt``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dynasparse.config import BaseConfig, CanonicalizeConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis, analyze
from dynasparse.passes.canonicalize import CanonicalizePass
from dynasparse.registry import Pass, PassResult, all_techniques, in_stage_order, technique_for


@dataclass
class PipelineResult:
    graph_module: torch.fx.GraphModule
    analysis: GraphAnalysis
    results: list[PassResult]
    canonical: GraphAnalysis  # right after canonicalization: the attention the model has


def build_passes(configs: BaseConfig | Sequence[BaseConfig]) -> list[Pass]:
    """Canonicalize first (with the user's CanonicalizeConfig if given), then one pass per config, ordered
    by the stage each technique rewrites (not by the order of ``configs``)."""
    if isinstance(configs, BaseConfig):
        configs = [configs]
    canonical, chosen = CanonicalizeConfig(), []
    for i, config in enumerate(configs):
        if not isinstance(config, BaseConfig):
            names = ", ".join(t.config.__name__ for t in all_techniques())
            raise DynasparseError(f"configs[{i}] is a {type(config).__name__}; expected a config object "
                                  f"({names}). Build one, e.g. dynasparse.CanonicalizeConfig().")
        if isinstance(config, CanonicalizeConfig):
            canonical = config
        else:
            chosen.append(config)
    return [CanonicalizePass(canonical), *(technique_for(c).make_pass(c) for c in in_stage_order(chosen))]


def _dump(gm: torch.fx.GraphModule, step: int, name: str) -> None:
    folder = os.environ.get("DYNASPARSE_DUMP_GRAPHS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{step:02d}_{name}.txt").write_text(str(gm.graph))


def run_pipeline(gm: torch.fx.GraphModule, passes: Sequence[Pass]) -> PipelineResult:
    results: list[PassResult] = []
    _dump(gm, 0, "captured")
    canonical = None
    for step, p in enumerate(passes, start=1):
        analysis = analyze(gm)
        if p.name != "canonicalize" and not analysis.sites:
            raise DynasparseError(f"pass {p.name!r} needs attention sites and the graph has none")
        try:
            result = p.apply(gm, analysis)
            gm.graph.lint()
            gm.recompile()
        except DynasparseError:
            raise
        except Exception as err:
            done = ", ".join(r.pass_name for r in results) or "none"
            raise RuntimeError(f"pass {p.name!r} failed (passes already run: {done}): {err}") from err
        results.append(result)
        if canonical is None:
            canonical = analyze(gm)
        _dump(gm, step, p.name)
    final = analyze(gm)  # before finishing: a graph that picks among variants holds its sites in branches
    for technique in all_techniques():
        gm = technique.finish_graph(gm)
    return PipelineResult(gm, final, results, canonical or final)
