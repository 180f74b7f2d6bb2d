"""Cross-technique tests, parametrized by the default list in ``default_configs.py``: JSON round trip, identity
at zero sparsity, batched row == row alone, every composition pair, and ``torch.library.opcheck`` on every
op a technique inserts (ONNX Runtime == torch: ``test_techniques_onnx.py``)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import dynasparse
from dynasparse.config import BaseConfig
from dynasparse.ir.ops import KV_CACHE_ATTENTION, KV_CACHE_ATTENTION_FUNCTIONAL
from dynasparse.registry import all_techniques

from default_configs import (BATCH_INVARIANT_PAIRS, DEFAULTS, MASK_ID, NEW_TOKENS, PAIRS, decoder_prompts,
                             dit_inputs, encoder_inputs, ids, masked_lm_inputs, model)


def run(kind: str, configs: list[BaseConfig], row: int | None = None) -> torch.Tensor:
    """Encoder: the classifier's logits; DiT: the denoiser's output (sampled: the final latents); decoder: the
    greedy new tokens; masked LM: the unmasked new tokens. ``row``: that row alone (an encoder row keeps its padding; a decoder row is its
    real tokens)."""
    if kind == "dit-sampled":
        inputs = {k: v if row is None else v[row:row + 1] for k, v in dit_inputs().items()}
        return dynasparse.sample(_optimized(kind, configs), inputs["hidden_states"], steps=SAMPLE_STEPS,
                                 conditioning={"class_labels": inputs["class_labels"]}, progress=False).latents
    if kind == "masked-lm":
        prompt = masked_lm_inputs()["input_ids"]
        prompt = prompt if row is None else prompt[row:row + 1]
        return dynasparse.unmask(_optimized(kind, configs), prompt, new_tokens=NEW_TOKENS, steps=NEW_TOKENS,
                                 mask_id=MASK_ID, progress=False).tokens[:, -NEW_TOKENS:]
    if kind in INPUTS:
        inputs = INPUTS[kind]()
        if row is not None:
            inputs = {k: v[row:row + 1] for k, v in inputs.items()}
        target = _optimized(kind, configs)
        with torch.no_grad():
            out = target(**inputs)
        return next(getattr(out, name) for name in ("logits", "sample") if hasattr(out, name)) if not isinstance(
            out, (tuple, list)) else out[0]
    ids, mask = decoder_prompts()
    if row is not None:
        ids, mask = ids[row:row + 1, mask[row].bool()], None
    return dynasparse.generate(model(kind), ids, mask, max_new_tokens=NEW_TOKENS, configs=configs).sequences[
        :, -NEW_TOKENS:]


INPUTS = {"encoder": encoder_inputs, "dit": dit_inputs}  # the kinds called once on a batch
EXAMPLES = {**INPUTS, "dit-sampled": dit_inputs, "masked-lm": masked_lm_inputs}  # what each kind is captured with
FLOATS = {*INPUTS, "dit-sampled"}  # the kinds whose results are floats (compared within 1e-5)
SAMPLE_STEPS = 6  # DDIM steps a dit-sampled entry runs
_last_optimized: list = []  # (kind, configs, optimized): a batch and its rows alone share one capture


def _optimized(kind: str, configs: list[BaseConfig]) -> torch.nn.Module:
    if not configs:
        return model(kind)
    if not (_last_optimized and _last_optimized[0] == kind and len(_last_optimized[1]) == len(configs)
            and all(a is b for a, b in zip(_last_optimized[1], configs))):
        _last_optimized[:] = [kind, list(configs), dynasparse.optimize(model(kind), configs,
                                                                       example_kwargs=EXAMPLES[kind]())]
    return _last_optimized[2]


def same(kind: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if kind in FLOATS:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", DEFAULTS, ids=ids(DEFAULTS))
def test_json_round_trip(entry):
    for config in (entry.sparse, entry.zero):
        assert BaseConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("entry", DEFAULTS, ids=ids(DEFAULTS))
def test_zero_sparsity_is_the_model(entry):
    same(entry.kind, run(entry.kind, [entry.zero]), run(entry.kind, []))


@pytest.mark.slow
@pytest.mark.parametrize("entry", DEFAULTS, ids=ids(DEFAULTS))
def test_batched_rows_equal_rows_alone(entry):
    batched = run(entry.kind, [entry.sparse])
    for row in range(batched.shape[0]):
        same(entry.kind, batched[row:row + 1], run(entry.kind, [entry.sparse], row))


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
def test_pairs_at_zero_sparsity_are_the_model(pair):
    a, b = pair
    same(a.kind, run(a.kind, [a.zero, b.zero]), run(a.kind, []))


@pytest.mark.slow
@pytest.mark.parametrize("pair", BATCH_INVARIANT_PAIRS, ids=ids(BATCH_INVARIANT_PAIRS))
def test_pairs_with_sparsity_batched_rows_equal_rows_alone(pair):
    a, b = pair
    batched = run(a.kind, [a.sparse, b.sparse])
    for row in range(batched.shape[0]):
        same(a.kind, batched[row:row + 1], run(a.kind, [a.sparse, b.sparse], row))


# --- opcheck on every op a technique inserts --------------------------------------------------------------------

class _FirstCalls(TorchDispatchMode):
    """Records the first call of every dynasparse op (arguments cloned before the op mutates them); a
    torch.cond (token density by timestep) runs its branch unrecorded."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if func.namespace == "dynasparse" and func not in self.calls:
            self.calls[func] = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
        return func(*args, **(kwargs or {}))


_recorded: dict = {}
SAME_ARGUMENTS = {KV_CACHE_ATTENTION_FUNCTIONAL: KV_CACHE_ATTENTION}  # the export form of the same step
OPS = sorted({op for t in all_techniques() for op in t.ops}, key=str)


def recorded_calls() -> dict:
    if not _recorded:
        with _FirstCalls() as recorder:
            for entry in DEFAULTS:
                run(entry.kind, [entry.sparse])
            by_id = {entry.id: entry.sparse for entry in DEFAULTS}  # sparse prefill over a bounded cache:
            run("decoder", [by_id["sparse-pooled"], by_id["kv-h2o"]])
            run("decoder", [by_id["sparse-query-aware-decode"], by_id["kv-h2o"]])  # and query-aware decode
            run("decoder", [by_id["sparse-pooled"], by_id["kv-int4-tier"]])  # and with a compressed tier
        _recorded.update(recorder.calls)
    return _recorded


@pytest.mark.parametrize("op", OPS, ids=[str(op) for op in OPS])
def test_opcheck(op):
    calls = recorded_calls()
    source = SAME_ARGUMENTS.get(op, op)
    assert source in calls, f"no default config inserts {op}: add one to default_configs.DEFAULTS"
    args, kwargs = calls[source]
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_autograd_registration",
                                                        "test_faketensor"))
