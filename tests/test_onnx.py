"""ONNX export: standard ops only, and ONNX Runtime matches PyTorch at other batch sizes and lengths."""
import onnx
import pytest
import torch

import dynasparse
from dynasparse.export.onnx import export_onnx
from dynasparse.runtime.ort import flat_outputs, ort_session

from conftest import ARCHITECTURES, load, make_inputs
from test_optimize import optimized

pytestmark = pytest.mark.slow  # exports and compiles: deselect locally with -m 'not slow'


# Mistral is Llama's graph with another config; Qwen2's biased projections also export in test_kv_eviction.py
@pytest.mark.parametrize("name", [a for a in ARCHITECTURES if a != "mistral-tiny"])
def test_onnx_runtime_matches(name, tmp_path):
    entry = load(name)
    path = export_onnx(optimized(name), tmp_path / "model.onnx")
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = ort_session(path)
    for batch, padded in [(1, False), (3, True)]:
        inputs = make_inputs(entry, batch, 7 + batch, padded)
        with torch.no_grad():
            expected = flat_outputs(entry.model(**inputs))
        actual = session(**inputs)
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0)


def test_plain_module_exports_directly(tmp_path):
    entry = load("gpt2-tiny")
    inputs = entry.make_inputs(2, 8)
    path = dynasparse.export_onnx(entry.model, tmp_path / "gpt2.onnx", example_kwargs=inputs)
    with torch.no_grad():
        expected = flat_outputs(entry.model(**inputs))
    torch.testing.assert_close(dynasparse.ort_session(path)(**inputs)[0], expected[0], atol=1e-4, rtol=0)


def test_unwritable_path_is_a_clear_error(tmp_path):
    with pytest.raises(dynasparse.DynasparseError, match="does not exist"):
        export_onnx(optimized("bert-tiny"), tmp_path / "missing" / "model.onnx")
    with pytest.raises(dynasparse.DynasparseError, match="is a directory"):
        export_onnx(optimized("bert-tiny"), tmp_path)


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    with pytest.raises(dynasparse.DynasparseError, match="no ONNX file"):
        ort_session(tmp_path / "nope.onnx")
