"""Token caching on diffusers' DiT (RAS): a plain call and a sampler that recomputes every token are the model,
the sampler runs the warmup / cached / refresh schedule it reports, a cached step recomputes the tokens whose
prediction moved most, PixArt's cross-attention reads the text whole, and bad input (SD3's joint attention
included) is named."""
import pytest
import torch

import dynasparse
from dynasparse import DynasparseError, TokenCacheConfig, TokenMergeConfig
from dynasparse.runtime.token_cache import ActiveTokens

diffusers = pytest.importorskip("diffusers", reason="the [diffusion] extra installs diffusers")


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                           num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 16, 16, generator=generator), "timestep": torch.full((2,), 400),
            "class_labels": torch.tensor([1, 3])}


def _optimize(dit, **config):
    return dynasparse.optimize(dit, [TokenCacheConfig(**config)], example_kwargs=_inputs())


def _sample(model, steps: int = 8):
    inputs = _inputs()
    return dynasparse.sample(model, inputs["hidden_states"], steps=steps,
                             conditioning={"class_labels": inputs["class_labels"]}, progress=False)


def test_a_plain_call_is_the_model(dit):
    optimized = _optimize(dit)
    with torch.no_grad():
        torch.testing.assert_close(optimized(**_inputs()).sample, dit(**_inputs()).sample, rtol=0, atol=0)
    assert "last block's output is cached for every token" in str(optimized.report)


def test_recomputing_every_token_samples_what_the_model_samples(dit):
    run = _sample(_optimize(dit, recompute_ratio=1.0))
    torch.testing.assert_close(run.latents, _sample(dit).latents, rtol=0, atol=1e-5)
    assert run.stats.keep == [1.0] * 8


def test_the_sampler_runs_warmup_cached_steps_and_refreshes(dit):
    run = _sample(_optimize(dit, recompute_ratio=0.25, warmup=0.25, refresh_every=3), steps=12)
    # 3 warmup steps, then two cached steps and a refresh, over and over
    assert run.stats.keep == [1.0, 1.0, 1.0, 0.25, 0.25, 1.0, 0.25, 0.25, 1.0, 0.25, 0.25, 1.0]


def test_a_cached_step_recomputes_the_tokens_whose_prediction_moved_most():
    active = ActiveTokens(TokenCacheConfig(recompute_ratio=0.125, warmup=0.0, refresh_every=100), steps=10,
                          length=16)
    assert active.choose(0) is None  # nothing measured yet: every token
    first = torch.zeros(2, 4, 8, 8)
    active.observe(first)
    moved = first.clone()
    moved[0, :, 0:2, 6:8] = 1.0  # row 0: token 3 (row-major patches of 2)
    moved[1, :, 6:8, 0:2] = 1.0  # row 1: token 12
    moved[:, :, 2:4, 2:4] = 0.5  # both rows: token 5, smaller
    active.observe(moved)
    assert active.choose(1).tolist() == [[3, 5], [5, 12]]  # each row its own, in position order


def _pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                               cross_attention_dim=32, caption_channels=24,
                                               use_additional_conditions=False).eval()
    return model, {"encoder_hidden_states": torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2))}


def test_a_cross_attention_reads_the_text_whole_for_the_active_queries():
    """PixArt: each block's self-attention is cached, its cross-attention over the text is left as it is."""
    model, text = _pixart()
    inputs = {**_inputs(), **text}
    del inputs["class_labels"]
    optimized = dynasparse.optimize(model, [TokenCacheConfig(recompute_ratio=1.0)], example_kwargs=inputs)
    assert "a cross-attention, run on the active queries" in str(optimized.report)
    with torch.no_grad():
        torch.testing.assert_close(optimized(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)
    noise = inputs["hidden_states"]
    ours = dynasparse.sample(optimized, noise, steps=4, conditioning=text, progress=False).latents
    torch.testing.assert_close(ours, dynasparse.sample(model, noise, steps=4, conditioning=text,
                                                       progress=False).latents, rtol=0, atol=1e-5)
    cached = dynasparse.optimize(model, [TokenCacheConfig(recompute_ratio=0.5, warmup=0.0)], example_kwargs=inputs)
    assert min(dynasparse.sample(cached, noise, steps=4, conditioning=text, progress=False).stats.keep) == 0.5


def test_a_joint_attention_is_refused_by_name():
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
                                          pos_embed_max_size=16).eval()
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16), "timestep": torch.full((2,), 400),
              "encoder_hidden_states": torch.randn(2, 5, 24), "pooled_projections": torch.randn(2, 12)}
    with pytest.raises(DynasparseError, match="joint attention over concatenated streams"):
        dynasparse.optimize(sd3, [TokenCacheConfig()], example_kwargs=inputs)


def test_bad_input_is_named(dit, tmp_path):
    with pytest.raises(DynasparseError, match="recompute_ratio"):
        TokenCacheConfig(recompute_ratio=0.0)
    with pytest.raises(DynasparseError, match="refresh_every"):
        TokenCacheConfig(refresh_every=0)
    with pytest.raises(DynasparseError, match="layers"):
        TokenCacheConfig(layers=(0,))
    with pytest.raises(DynasparseError, match="does not compose with TokenMergeConfig"):
        dynasparse.optimize(dit, [TokenCacheConfig(), TokenMergeConfig(keep_ratio=0.5)], example_kwargs=_inputs())
    with pytest.raises(DynasparseError, match="export the model without TokenCacheConfig"):
        dynasparse.export_onnx(_optimize(dit), tmp_path / "model.onnx")
    compiled = torch.compile(dit, backend="dynasparse", options={"configs": [TokenCacheConfig()]})
    with pytest.raises(Exception, match="would recompute every token"), torch.no_grad():
        compiled(**_inputs())
