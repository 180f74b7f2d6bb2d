"""Diffusers' transformer backbones (DiT, PixArt-α, SD3's MMDiT), built from small configs: captured with their
timestep and class / text conditioning as inputs, they reproduce the model through every entry point, and a
pass that cannot apply says why."""
import pytest
import torch

import dynasparse
from dynasparse import BaseConfig, TokenMergeConfig

diffusers = pytest.importorskip("diffusers", reason="the [diffusion] extra installs diffusers")

LATENT = 16  # 16x16 latents in patches of 2: 64 image tokens


def _dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=LATENT, patch_size=2,
                                            num_embeds_ada_norm=10, norm_type="ada_norm_zero")
    return model.eval(), {"class_labels": torch.tensor([1, 3])}


def _pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=LATENT, patch_size=2,
                                               cross_attention_dim=32, caption_channels=24,
                                               use_additional_conditions=False)
    return model.eval(), {"encoder_hidden_states": torch.randn(2, 5, 24)}


def _sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                            caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
                                            pos_embed_max_size=16)
    return model.eval(), {"encoder_hidden_states": torch.randn(2, 5, 24), "pooled_projections": torch.randn(2, 12)}


BACKBONES = {"dit": _dit, "pixart": _pixart, "sd3": _sd3}


def _inputs(conditioning: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, LATENT, LATENT, generator=generator)
    return {"hidden_states": latents, "timestep": torch.tensor([10, 500]), **conditioning}


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_optimize_and_compile_reproduce_the_backbone(name):
    model, conditioning = BACKBONES[name]()
    inputs = _inputs(conditioning)
    with torch.no_grad():
        expected = model(**inputs).sample
        optimized = dynasparse.optimize(model, [], example_kwargs=inputs)
        torch.testing.assert_close(_sample(optimized(**inputs)), expected, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(model, backend="dynasparse")
        torch.testing.assert_close(compiled(**inputs).sample, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_onnx_runtime_reproduces_the_backbone(name, tmp_path):
    """PixArt's ``squeeze(1)`` of its token dim is a no-op in torch and an error in ONNX Runtime: export drops
    squeezes of dynamic dims. (DiT: test_techniques_onnx.py runs its default-list entries, whose dense band
    reproduces the model.)"""
    model, conditioning = BACKBONES[name]()
    inputs = _inputs(conditioning)
    optimized = dynasparse.optimize(model, [], example_kwargs=inputs)
    session = dynasparse.ort_session(dynasparse.export_onnx(optimized, tmp_path / f"{name}.onnx"))
    with torch.no_grad():
        expected = model(**inputs).sample
    torch.testing.assert_close(session(**inputs)[0], expected, atol=1e-5, rtol=1e-4)


def test_token_merging_leaves_a_joint_attention_dense_and_says_why():
    model, conditioning = _sd3()
    inputs = _inputs(conditioning)
    optimized = dynasparse.optimize(model, [TokenMergeConfig(keep_ratio=0.5)], example_kwargs=inputs)
    assert "a joint attention over concatenated streams" in str(optimized.report)
    with torch.no_grad():
        torch.testing.assert_close(_sample(optimized(**inputs)), model(**inputs).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_merging_unmerges_to_the_latent_grid_and_rows_are_independent(name):
    """PixArt's blocks hold a self- and a cross-attention: tokens merge after both, before the MLP."""
    model, conditioning = BACKBONES[name]()
    inputs = _inputs(conditioning)
    optimized = dynasparse.optimize(model, [TokenMergeConfig(keep_ratio=0.5, min_tokens=16)], example_kwargs=inputs)
    assert "block 1: bipartite" in str(optimized.report) and "64 → 40 tokens" in str(optimized.report)
    with torch.no_grad():
        batched = _sample(optimized(**inputs))
        assert batched.shape == model(**inputs).sample.shape
        for row in range(2):
            alone = _sample(optimized(**{k: v[row:row + 1] for k, v in inputs.items()}))
            torch.testing.assert_close(alone[0], batched[row], atol=1e-5, rtol=1e-5)


# --- token density by timestep (FlexDiT, DyDiT) -------------------------------------------------------------------

SCHEDULE = TokenMergeConfig(timestep_schedule=((0, 0.5), (400, 1.0)), min_tokens=16)


def test_timestep_schedule_picks_the_band_inside_one_graph():
    """Noisy steps (t >= 400) run every token, late ones merge as keep_ratio=0.5 does; eager and compiled."""
    model, conditioning = _dit()
    inputs = _inputs(conditioning)  # timesteps 10 and 500: a batch runs the band of its noisiest row
    late = {**inputs, "timestep": torch.tensor([10, 100])}
    optimized = dynasparse.optimize(model, [SCHEDULE], example_kwargs=inputs)
    assert "t >= 400: 100%, t >= 0: 50%" in str(optimized.report)
    assert any(n.target is torch.ops.higher_order.cond for n in optimized.graph_module.graph.nodes)
    merged = dynasparse.optimize(model, [TokenMergeConfig(keep_ratio=0.5, min_tokens=16)], example_kwargs=inputs)
    compiled = torch.compile(model, backend="dynasparse", options={"configs": [SCHEDULE]})
    with torch.no_grad():
        for call, expected in ((inputs, model(**inputs).sample), (late, _sample(merged(**late)))):
            torch.testing.assert_close(_sample(optimized(**call)), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled(**call).sample, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_sample(merged(**late)), model(**late).sample, atol=1e-3)


def test_sampling_runs_the_schedule_step_by_step():
    """DDIM over the captured DiT: the stats name each step's band; every band at 1.0 samples as the model."""
    model, conditioning = _dit()
    inputs = _inputs(conditioning)
    noise = inputs["hidden_states"]
    scheduled = dynasparse.optimize(model, [SCHEDULE], example_kwargs=inputs)
    run = dynasparse.sample(scheduled, noise, steps=4, conditioning=conditioning, progress=False)
    assert run.stats.timesteps == [750, 500, 250, 0] and run.stats.keep == [1.0, 1.0, 0.5, 0.5]
    dense = dynasparse.optimize(model, [TokenMergeConfig(timestep_schedule=((0, 1.0), (400, 1.0)))],
                                example_kwargs=inputs)
    torch.testing.assert_close(dynasparse.sample(dense, noise, steps=4, conditioning=conditioning, progress=False).latents,
                               dynasparse.sample(model, noise, steps=4, conditioning=conditioning, progress=False).latents,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: TokenMergeConfig(timestep_schedule=((0, 0.5), (1000, 1.0))), r"timesteps \[1000.0\] outside"),
    (lambda: TokenMergeConfig(timestep_schedule=((100, 0.5),)), "start the lowest band at 0"),
    (lambda: TokenMergeConfig(timestep_schedule=((0, 0.5),), keep_ratio=0.5), "leave r and keep_ratio unset"),
    (lambda: TokenMergeConfig(timestep_schedule=((0, 1.5),)), r"keep ratios lie in \(0, 1\]"),
    (lambda: TokenMergeConfig(timestep_schedule=((0, 0.5),), dense_below=64), "leave dense_below at 0"),
])
def test_bad_schedules_fail_clearly(make, message):
    with pytest.raises(dynasparse.DynasparseError, match=message):
        make()


@pytest.mark.parametrize("config, message", [
    (TokenMergeConfig(timestep_schedule=((0, 0.5),), timestep_input="t"),
     "no tensor input of that name \\(inputs seen: hidden_states, timestep, class_labels\\)"),
    (TokenMergeConfig(keep_ratio=0.5, layers=(1, 5)), r"names blocks \[5\]; the model has blocks 0..1"),
])
def test_a_schedule_the_model_cannot_take_fails_clearly(config, message):
    model, conditioning = _dit()
    with pytest.raises(dynasparse.DynasparseError, match=message):
        dynasparse.optimize(model, [config], example_kwargs=_inputs(conditioning))


def test_calibration_picks_each_band_for_an_output_error_target():
    """Bands with keep ratio None take the lowest ratio whose output stays within max_output_error of the dense
    output on calibration batches at their timesteps: a loose target merges, a tight one keeps every token."""
    model, conditioning = _dit()
    inputs = _inputs(conditioning)
    batches = [{**inputs, "timestep": torch.tensor([t, t])} for t in (50, 300)]
    chosen = {}
    for target in (0.9, 1e-6):
        config = TokenMergeConfig(timestep_schedule=((0, None), (400, 1.0)), min_tokens=16, max_output_error=target)
        optimized = dynasparse.optimize(model, [config], example_kwargs=inputs, calibration=batches)
        assert "calibrated for an output error" in str(optimized.report)
        chosen[target] = optimized.graph_module.meta["dynasparse.timestep_bands"].bands[0][1]
        assert BaseConfig.from_json(config.to_json()) == config
    assert chosen == {0.9: 0.5, 1e-6: 1.0}  # one merged block: at most half its tokens
    with pytest.raises(dynasparse.DynasparseError, match="no calibration batch has its timesteps in the band t >= 0"):
        dynasparse.optimize(model, [TokenMergeConfig(timestep_schedule=((0, None), (400, None)), min_tokens=16)],
                            example_kwargs=inputs, calibration=[{**inputs, "timestep": torch.tensor([500, 500])}])
    with pytest.raises(dynasparse.DynasparseError, match="pass optimize\\(..., calibration="):
        dynasparse.optimize(model, [TokenMergeConfig(timestep_schedule=((0, None),))], example_kwargs=inputs)
