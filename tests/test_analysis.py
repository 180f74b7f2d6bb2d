"""Graph analysis: layers, heads, causality, blocks, residual stream and head, from the graph alone."""
import dynasparse

from conftest import load


def analysis_of(name):
    entry = load(name)
    return dynasparse.optimize(entry.model, [], example_kwargs=entry.make_inputs(2, 8)).report.analysis


def test_decoder_sites_are_causal_gqa():
    analysis = analysis_of("llama-tiny")
    assert [s.layer for s in analysis.sites] == [0, 1]
    site = analysis.sites[0]
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.causal) == (4, 2, 16, True)
    assert site.module == "layers.0.self_attn"
    assert analysis.head_modules == ["norm"]


def test_gpt2_is_causal_and_encoders_are_not():
    assert all(s.causal for s in analysis_of("gpt2-tiny").sites)
    assert not any(s.causal for s in analysis_of("bert-tiny").sites)
    assert not any(s.causal for s in analysis_of("vit-tiny").sites)


def test_blocks_chain_the_residual_stream():
    analysis = analysis_of("minilm")
    assert [b.module for b in analysis.blocks] == [f"encoder.layer.{i}" for i in range(6)]
    assert [b.sites for b in analysis.blocks] == [[i] for i in range(6)]
    for before, after in zip(analysis.blocks, analysis.blocks[1:]):
        assert after.input is before.output
    stream = analysis.residual_stream
    assert len(stream) == 7
    assert all(tuple(node.meta["val"].shape)[-1] == 384 for node in stream)
    assert analysis.head_modules == ["pooler"]


def test_handwritten_module_blocks():
    analysis = analysis_of("examples.handwritten_attention:TinyTransformer")
    assert [b.module for b in analysis.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert analysis.site_for_layer(2).module == "blocks.2.attn"
    assert analysis.head_modules == ["norm"]


def test_networkx_view_connects_sites():
    analysis = analysis_of("llama-tiny")
    import networkx as nx

    assert nx.has_path(analysis.graph, analysis.sites[0].node, analysis.sites[1].node)
