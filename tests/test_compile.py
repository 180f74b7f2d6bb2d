"""torch.compile(model, backend="dynasparse"): same outputs, attention rewritten, no graph breaks."""
import pytest
import torch
import torch._dynamo

from conftest import ARCHITECTURES, EXPECTED_SITES, load, make_inputs
from test_optimize import assert_same_outputs

pytestmark = pytest.mark.slow  # exports and compiles: deselect locally with -m 'not slow'


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_compile_identity(name):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    entry = load(name)
    reports = []
    compiled = torch.compile(entry.model, backend="dynasparse", options={"on_report": reports.append})
    for batch, padded in [(1, False), (3, True)]:
        inputs = make_inputs(entry, batch, 10, padded)
        with torch.no_grad():
            assert_same_outputs(entry.model(**inputs), compiled(**inputs))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert reports and all(len(r.analysis.sites) == EXPECTED_SITES[name] for r in reports)


def test_compile_without_inductor_runs_the_rewritten_graph():
    torch._dynamo.reset()
    entry = load("llama-tiny")
    reports = []
    compiled = torch.compile(entry.model, backend="dynasparse", options={"inductor": False, "on_report": reports.append})
    inputs = make_inputs(entry, 2, 9, True)
    with torch.no_grad():
        assert_same_outputs(entry.model(**inputs), compiled(**inputs))
    assert reports[0].passes[0].num_matches == 2


def test_unknown_backend_option_is_an_error():
    torch._dynamo.reset()
    entry = load("bert-tiny")
    compiled = torch.compile(entry.model, backend="dynasparse", options={"confgs": []})
    with pytest.raises(Exception, match="unknown dynasparse backend options"):
        compiled(**make_inputs(entry, 2, 8, False))
