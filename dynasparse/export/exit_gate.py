"""ONNX spelling of ``exit_confidence``: softmax statistics, TopK margin, cosine and ArgMax."""
from __future__ import annotations

from onnxscript import opset18 as op

from dynasparse.export.spellings import FLOAT, INT64, float_scalar, ints
from dynasparse.ir.ops import EXIT_CONFIDENCE

_LOGIT_CRITERIA = ("max_prob", "margin", "entropy", "patience")


def _per_row_min(values):
    """[B, ...] → [B]: a row is as confident as its least confident position."""
    return op.ReduceMin(op.Reshape(values, ints(0, -1)), ints(1), keepdims=0)


def _logit_confidence(logits, criterion: str):
    x = op.Cast(logits, to=FLOAT)
    probs = op.Softmax(x, axis=-1)
    if criterion in ("max_prob", "patience"):
        return op.ReduceMax(probs, ints(-1), keepdims=0)
    if criterion == "margin":
        top, _ = op.TopK(probs, ints(2), axis=-1)
        first = op.Gather(top, ints(0), axis=-1)
        second = op.Gather(top, ints(1), axis=-1)
        return op.Squeeze(op.Sub(first, second), ints(-1))
    # entropy: 0 * log 0 counts as 0, and a one-word vocabulary is fully confident
    plogp = op.Where(op.Greater(probs, float_scalar(0.0)), op.Mul(probs, op.Log(probs)), float_scalar(0.0))
    entropy = op.Neg(op.ReduceSum(plogp, ints(-1), keepdims=0))
    vocab = op.Cast(op.Shape(x, start=-1), to=FLOAT)
    log_vocab = op.Squeeze(op.Log(vocab), ints(0))
    safe = op.Where(op.Greater(log_vocab, float_scalar(0.0)), log_vocab, float_scalar(1.0))
    return op.Sub(float_scalar(1.0), op.Div(entropy, safe))


def _cosine(hidden, previous):
    """Like ``torch.nn.functional.cosine_similarity`` (eps 1e-8 on the product of norms), clamped."""
    h, p = op.Cast(hidden, to=FLOAT), op.Cast(previous, to=FLOAT)
    dot = op.ReduceSum(op.Mul(h, p), ints(-1), keepdims=0)
    norms = op.Mul(op.ReduceL2(h, ints(-1), keepdims=0), op.ReduceL2(p, ints(-1), keepdims=0))
    cosine = op.Div(dot, op.Max(norms, float_scalar(1e-8)))
    return op.Clip(cosine, float_scalar(-1.0), float_scalar(1.0))


def exit_confidence(logits, hidden, previous, criterion: str):
    per_position = _cosine(hidden, previous) if criterion == "saturation" else _logit_confidence(logits, criterion)
    prediction = op.ArgMax(logits, axis=-1, keepdims=0)
    return _per_row_min(per_position), op.Cast(prediction, to=INT64)


EXIT_GATE_TRANSLATIONS = {EXIT_CONFIDENCE: exit_confidence}
