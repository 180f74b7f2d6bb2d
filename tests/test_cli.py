"""The CLI, as a user runs it."""
import subprocess
import sys

from dynasparse.cli import main


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
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "dynasparse", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "inspect" in done.stdout
