"""ONNX Runtime == torch for every default config whose technique exports (``Default.exports``), in a file of
its own so the suite's workers share the exports."""
import pytest
import torch

import dynasparse

from default_configs import DEFAULTS, NEW_TOKENS, decoder_prompts, dit_inputs, encoder_inputs, ids, model

# Eviction policies export through one cache op and differ only in the score traced inside it. A decode
# step's export costs 25-45 s on 2 cores, so ONNX Runtime runs one policy per kind of score: attention
# masses taken over an observation window (snapkv), the most attention a re-read paid (kvzip) and per-head
# groups (retrieval heads). h2o sums the same masses kvzip takes the max of; streaming, TOVA, key norms,
# h2o_mean and expected attention score from the same inputs with plain tensor ops (positions cast to float,
# a softmax row, norms, a mean, query statistics). Whole retrieval heads are the retrieval-heads export with
# KVzip in the other group. Token merging's modes run through ONNX Runtime in test_token_merge_onnx.py,
# staged exits in test_exit_gate.py; block-sparse attention on a DiT is sparse-encoder's export on another model.
SAME_EXPORT_AS_TESTED = {"kv-h2o", "kv-streaming", "kv-tova", "kv-knorm", "kv-h2o_mean", "kv-expected_attention",
                         "kv-whole-retrieval-heads", "merge-bipartite", "merge-prune", "exit-staged", "sparse-dit"}
EXPORTED = [entry for entry in DEFAULTS if entry.exports and entry.id not in SAME_EXPORT_AS_TESTED]


@pytest.mark.slow
@pytest.mark.parametrize("entry", EXPORTED, ids=ids(EXPORTED))
def test_onnx_runtime_equals_torch(entry, tmp_path):
    """The exported file, run by ONNX Runtime, gives the torch logits (encoder), denoiser output (DiT, at late
    and at noisy timesteps: both bands of a timestep schedule) or tokens (decoder)."""
    if entry.kind in ("encoder", "dit"):
        inputs = encoder_inputs() if entry.kind == "encoder" else dit_inputs()
        optimized = dynasparse.optimize(model(entry.kind), [entry.sparse], example_kwargs=inputs)
        session = dynasparse.ort_session(dynasparse.export_onnx(optimized, tmp_path / "model.onnx"))
        calls = [inputs] if entry.kind == "encoder" else [inputs, {**inputs, "timestep": inputs["timestep"] + 600}]
        for call in calls:
            with torch.no_grad():
                expected = optimized(**call)
            torch.testing.assert_close(session(**call)[0], expected.logits if hasattr(expected, "logits")
                                       else expected[0], atol=1e-4, rtol=1e-4)
        return
    decoder = dynasparse.runtime.generate.decoder_for(model("decoder"), [entry.sparse])
    session = dynasparse.ort_session(dynasparse.export_onnx(decoder, tmp_path / "step.onnx"))
    ids_, mask = decoder_prompts()
    assert torch.equal(dynasparse.generate(session, ids_, mask, max_new_tokens=NEW_TOKENS).sequences,
                       dynasparse.generate(model("decoder"), ids_, mask, max_new_tokens=NEW_TOKENS,
                                           configs=[entry.sparse]).sequences)
