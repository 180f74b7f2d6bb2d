"""Early-exit gates: how confident an intermediate prediction is, and the compaction of the rows that go on.

``logit_confidence``: three confidence scores of each row of logits [N, V], read by the gate that decides
whether a token exits at this layer. All three are computed in fp32 (fp16/bf16 logits are upcast first):

* row 0: the max softmax probability p1;
* row 1: the top-2 margin p1 - p2 (0 when V == 1: there is no runner-up to beat);
* row 2: the normalized entropy confidence 1 - H / log(V), H = -sum p log p in nats (1 when V == 1).

Logits may hold -inf (masked vocabulary entries; their probability is 0 and 0 * log 0 counts as 0), but every
row needs at least one finite value.

``learned_features``: what a learned gate (JEI-DNN) reads at an exit: the three scores above, and how the
exit's prediction relates to the previous exit's (agreement, PABEE's signal, in probabilities).

``compact_rows``: the rows that did not exit, gathered to the front (``x.index_select(0, index)``), so the
next layers run on fewer rows.

The torch references here are the oracle of the Triton kernels in ``exit_gate_triton``; the dispatchers use
Triton only on CUDA tensors when it is installed.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch


@functools.cache
def _has_triton() -> bool:
    """Checked once: the kernels are optional, a CPU-only install has no triton."""
    return importlib.util.find_spec("triton") is not None


def logit_confidence_reference(logits: torch.Tensor) -> torch.Tensor:
    """[3, N] float32 (max probability, top-2 margin, entropy confidence) of logits [N, V]."""
    x = logits.float()
    vocab = x.shape[-1]
    log_p = x.log_softmax(dim=-1)
    p = log_p.exp()
    top = p.topk(min(2, vocab), dim=-1).values
    p1 = top[:, 0]
    margin = top[:, 0] - top[:, 1] if vocab > 1 else torch.zeros_like(p1)
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)  # 0 * log 0 = 0 for -inf logits
    confidence = 1.0 - entropy / math.log(vocab) if vocab > 1 else torch.ones_like(p1)
    return torch.stack([p1, margin, confidence])


def logit_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``logit_confidence_reference`` of logits [..., V]: [3, ...] float32, Triton on CUDA."""
    leading = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.is_cuda and _has_triton():
        from dynasparse.kernels.exit_gate_triton import logit_confidence_triton
        out = logit_confidence_triton(flat)
    else:
        out = logit_confidence_reference(flat)
    return out.reshape(3, *leading)


def compact_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for index int64 [M]: a plain row copy on CUDA, any rank >= 1 and dtype."""
    if x.is_cuda and x.is_contiguous() and _has_triton():
        from dynasparse.kernels.exit_gate_triton import compact_rows_triton
        return compact_rows_triton(x, index)
    return x.index_select(0, index)


# --- the gate: criteria and the exit decision ----------------------------------------------------------------

CRITERIA = ("max_prob", "margin", "entropy", "saturation", "patience", "learned")
# exit when the confidence is strictly above: patience gates on agreement, its threshold on max_prob is optional;
# a learned gate's confidence is its estimate that the exit predicts what the full model would
DEFAULT_THRESHOLDS = {"max_prob": 0.9, "margin": 0.8, "entropy": 0.8, "saturation": 0.99, "patience": 0.0,
                      "learned": 0.9}
_LOGIT_ROW = {"max_prob": 0, "margin": 1, "entropy": 2, "patience": 0}


def gate_confidence(logits: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor, criterion: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [B] fp32, prediction = ``logits.argmax(-1)``) at a gate.

    ``saturation`` is the cosine of each position's hidden state with the block's input (CALM: the
    representation stopped changing), clamped to [-1, 1]. A row with several positions is as confident as
    its least confident position.
    """
    batch = logits.shape[0]
    if criterion == "saturation":
        per_position = torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1).clamp(-1, 1)
    else:
        per_position = logit_confidence(logits)[_LOGIT_ROW[criterion]]
    return per_position.reshape(batch, -1).amin(1), logits.argmax(-1)


LEARNED_FEATURES = ("max_prob", "margin", "entropy", "prob_of_previous", "agrees_with_previous", "previous_max_prob")


def learned_features(logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[..., 6] float32 features of each position of an exit's logits [..., V] and the previous exit's
    (the same logits at the first gate), in ``LEARNED_FEATURES`` order."""
    scores = logit_confidence(logits)
    x, before = logits.float(), previous.float()
    guess = before.argmax(-1, keepdim=True)
    prob_of_previous = (x.gather(-1, guess) - x.logsumexp(-1, keepdim=True)).exp()[..., 0]
    agrees = (logits.argmax(-1) == guess[..., 0]).float()
    previous_max = (before.amax(-1) - before.logsumexp(-1)).exp()
    return torch.stack([*scores, prob_of_previous, agrees, previous_max], dim=-1)


def learned_probability(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[...] fp32: a learned gate's estimate, per position, that the exit predicts what the full model would
    (the logistic map of ``learned_features`` [..., 6])."""
    return torch.sigmoid(features @ weight.float() + bias.float())


def learned_confidence(logits: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [B] fp32, prediction) of a learned gate: ``learned_probability`` of each position, a row
    as confident as its least confident position. Zero weights give 0.5 everywhere, below the default
    threshold: an unfitted gate never exits."""
    per_position = learned_probability(learned_features(logits, previous), weight, bias)
    return per_position.reshape(logits.shape[0], -1).amin(1), logits.argmax(-1)


def exit_decision(confidence: torch.Tensor, prediction: torch.Tensor, previous: torch.Tensor | None,
                  agreeing: torch.Tensor, threshold: float, criterion: str, patience: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that exit at this gate [B] bool, gates in a row with this prediction [B]).

    The runtime and calibration both decide here, so calibration simulates exactly what will run.
    ``patience`` (PABEE): exit once the same prediction came out of ``patience`` gates in a row.
    """
    if previous is None:
        agreeing = torch.ones_like(agreeing)
    else:
        same = (prediction == previous).reshape(prediction.shape[0], -1).all(1)
        agreeing = torch.where(same, agreeing + 1, torch.ones_like(agreeing))
    fire = confidence > threshold
    if criterion == "patience":
        fire = fire & (agreeing >= patience)
    return fire, agreeing
