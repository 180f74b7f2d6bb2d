"""Bad input gets an error that names the problem and the fix."""
import pytest
import torch

import dynasparse
from dynasparse import CanonicalizeConfig, DynasparseError

from conftest import load


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def forward(self, x):
        return self.mlp(x).softmax(-1)


def test_model_without_attention():
    with pytest.raises(DynasparseError, match="no attention site found in NoAttention"):
        dynasparse.optimize(NoAttention(), [], example_inputs=(torch.randn(2, 8),))


def test_example_inputs_that_do_not_fit_forward():
    with pytest.raises(DynasparseError, match="example inputs do not match NoAttention.forward"):
        dynasparse.optimize(NoAttention(), [], example_kwargs={"pixel_values": torch.randn(1, 3, 8, 8)})
    with pytest.raises(DynasparseError, match="example inputs do not match the model: BertModel itself raised"):
        dynasparse.optimize(load("bert-tiny").model, [], example_kwargs={"pixel_values": torch.randn(1, 3, 8, 8)})


def test_no_tensor_inputs():
    with pytest.raises(DynasparseError, match="no tensor among the example inputs"):
        dynasparse.optimize(NoAttention(), [], example_inputs=(3,))


def test_calling_with_other_arguments_than_captured():
    entry = load("bert-tiny")
    model = dynasparse.optimize(entry.model, [], example_kwargs=entry.make_inputs(2, 8))
    with pytest.raises(DynasparseError, match=r"missing \['attention_mask'\]"):
        model(input_ids=entry.make_inputs(2, 8)["input_ids"])


def test_shape_fixed_at_capture():
    entry = load("vit-tiny")
    model = dynasparse.optimize(entry.model, [], example_kwargs=entry.make_inputs(2, 0))
    with pytest.raises(DynasparseError, match="fixed when the model was captured"):
        model(pixel_values=torch.randn(2, 3, 48, 48))


def test_configs_must_be_config_objects():
    with pytest.raises(DynasparseError, match=r"configs\[0\] is a dict"):
        dynasparse.optimize(NoAttention(), [{"r": 4}], example_inputs=(torch.randn(2, 8),))


def test_out_of_range_config_value():
    with pytest.raises(DynasparseError, match="layers must be layer indices >= 0"):
        CanonicalizeConfig(layers=[0, -1])


def test_unknown_config_field():
    with pytest.raises(DynasparseError, match=r"has no field\(s\) \['bogus'\]"):
        CanonicalizeConfig.from_dict({"type": "CanonicalizeConfig", "bogus": 1})


def test_calibration_without_a_config_that_uses_it():
    with pytest.raises(DynasparseError, match="none of the configs uses calibration"):
        dynasparse.optimize(NoAttention(), [], example_inputs=(torch.randn(2, 8),), calibration=[1])


def test_not_a_module():
    with pytest.raises(DynasparseError, match="expected a torch.nn.Module"):
        dynasparse.optimize(lambda x: x, [], example_inputs=(torch.randn(2),))
