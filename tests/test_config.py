import pytest

from dynasparse import BaseConfig, CanonicalizeConfig, DynasparseError


def test_json_round_trip():
    config = CanonicalizeConfig(layers=(0, 2), fold_repeat_kv=False)
    again = BaseConfig.from_json(config.to_json())
    assert again == config and isinstance(again, CanonicalizeConfig)


def test_unknown_type():
    with pytest.raises(DynasparseError, match="unknown config type 'Nope'"):
        BaseConfig.from_dict({"type": "Nope"})


def test_layers_filter():
    assert CanonicalizeConfig(layers=[1]).applies_to(1)
    assert not CanonicalizeConfig(layers=[1]).applies_to(0)
    assert CanonicalizeConfig().applies_to(5)
