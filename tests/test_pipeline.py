"""The pass contract: configs map to passes, each pass reports, the graph is dumped per pass on request."""
import dataclasses

import pytest

import dynasparse
from dynasparse.config import BaseConfig, config_type
from dynasparse.registry import PassResult, register_pass

from conftest import load


@config_type
@dataclasses.dataclass
class MarkSitesConfig(BaseConfig):
    fail: bool = False


@register_pass(MarkSitesConfig)
class MarkSitesPass:
    """A do-nothing pass: visits the sites the config selects and leaves the rest dense."""

    name = "mark-sites"

    def __init__(self, config):
        self.config = config

    def apply(self, gm, analysis):
        if self.config.fail:
            raise RuntimeError("boom")
        result = PassResult(self.name)
        for site in analysis.sites:
            if self.config.applies_to(site.layer):
                result.num_matches += 1
                result.applied.append(site.node.name)
            else:
                result.left_dense[site.node.name] = f"layer {site.layer} not selected"
        return result


def test_pass_results_reach_the_report():
    entry = load("llama-tiny")
    model = dynasparse.optimize(entry.model, [MarkSitesConfig(layers=(1,))], example_kwargs=entry.make_inputs(2, 8))
    names = [p.pass_name for p in model.report.passes]
    assert names == ["canonicalize", "mark-sites"]
    assert model.report.passes[1].num_matches == 1
    assert list(model.report.left_dense.values()) == ["layer 0 not selected"]
    assert "layer 0 not selected" in str(model.report)


def test_failing_pass_names_what_ran_before():
    entry = load("bert-tiny")
    with pytest.raises(RuntimeError, match=r"pass 'mark-sites' failed \(passes already run: canonicalize\)"):
        dynasparse.optimize(entry.model, [MarkSitesConfig(fail=True)], example_kwargs=entry.make_inputs(2, 8))


def test_graph_dump_per_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNASPARSE_DUMP_GRAPHS", str(tmp_path))
    entry = load("bert-tiny")
    dynasparse.optimize(entry.model, [MarkSitesConfig()], example_kwargs=entry.make_inputs(2, 8))
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == ["00_captured.txt", "01_canonicalize.txt", "02_mark-sites.txt"]
    assert "scaled_dot_product_attention" in (tmp_path / "00_captured.txt").read_text()
    assert "dynasparse.attention" in (tmp_path / "01_canonicalize.txt").read_text()


def test_canonicalize_config_can_keep_sdpa():
    entry = load("bert-tiny")
    with pytest.raises(dynasparse.DynasparseError, match="no attention site"):
        dynasparse.optimize(entry.model, [dynasparse.CanonicalizeConfig(sdpa=False)],
                            example_kwargs=entry.make_inputs(2, 8))


def test_fold_repeat_kv_off_keeps_repeated_heads():
    entry = load("llama-tiny")
    model = dynasparse.optimize(entry.model, [dynasparse.CanonicalizeConfig(fold_repeat_kv=False)],
                                example_kwargs=entry.make_inputs(2, 8))
    assert {(s.num_heads, s.num_kv_heads) for s in model.report.analysis.sites} == {(4, 4)}
