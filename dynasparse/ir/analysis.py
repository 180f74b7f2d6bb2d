"""Graph analysis over a canonicalized graph: attention sites, blocks, the residual stream, the head.

Everything later passes ask ("insert after block i", "the keys of layer j", "is this site causal?") is
answered here from the graph itself (export's module stack and fake values), never from model classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch
from torch.fx import Node

from dynasparse.errors import DynasparseError
from dynasparse.ir.nodes import aten, block_path, bound_args, fake, hint, is_call, layer_index, module_paths
from dynasparse.ir.ops import ATTENTION, BLOCK_SPARSE_ATTENTION

_POSITION_COMPARISONS = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor}
_TRIANGLES = {aten.tril.default, aten.triu.default}


@dataclass
class AttentionSite:
    """One attention node (``dynasparse::attention``, or block-sparse after that pass) and what it computes."""

    index: int
    node: Node
    layer: int | None
    module: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    has_mask: bool
    q_len: str
    kv_len: str
    example_shape: tuple[int, int, int]  # (batch, q_len, kv_len) at the example inputs
    sparse: bool = False  # a block-sparse attention node (the sparse_attention pass ran here)

    @property
    def q(self) -> Node:
        return self.node.args[0]

    @property
    def k(self) -> Node:
        return self.node.args[1]

    @property
    def v(self) -> Node:
        return self.node.args[2]

    def flops(self, batch: int, q_len: int, kv_len: int) -> float:
        """Multiply-adds ×2 of QK^T and PV (causal sites do about half)."""
        dense = 4.0 * batch * self.num_heads * q_len * kv_len * self.head_dim
        return dense / 2 if self.causal else dense


@dataclass
class Block:
    """A transformer block: the nodes of one indexed module that holds attention sites."""

    index: int
    module: str
    sites: list[int]
    input: Node | None
    output: Node | None


@dataclass
class GraphAnalysis:
    sites: list[AttentionSite]
    blocks: list[Block]
    head_modules: list[str]
    graph: nx.DiGraph = field(repr=False)

    @property
    def residual_stream(self) -> list[Node]:
        """Hidden state entering block 0, then the output of each block."""
        stream = [self.blocks[0].input] if self.blocks and self.blocks[0].input is not None else []
        return stream + [b.output for b in self.blocks if b.output is not None]

    def site_for_layer(self, layer: int) -> AttentionSite | None:
        return next((s for s in self.sites if s.layer == layer), None)


MLP_NAMES = ("mlp", "feed_forward", "ffn")  # a block's MLP module, as Llama / Qwen2 / Mistral / GPT-2 name it


@dataclass
class MLPSite:
    """A block's MLP: its nodes in graph order (calls inside the MLP module), the one tensor it reads and
    the one it leaves."""

    members: list[Node]
    input: Node
    output: Node


def find_mlp(gm: torch.fx.GraphModule, block_module: str) -> MLPSite | str:
    """The MLP of the block at ``block_module``, or why the block has none that a pass can rewrite whole."""
    paths = {f"{block_module}.{name}" for name in MLP_NAMES}
    members = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module") and paths & set(module_paths(n))]
    if not members:
        return f"no MLP module ({' / '.join(MLP_NAMES)}) in this block"
    inside = set(members)
    inputs = {a for n in members for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    tensors = [a for a in inputs if isinstance(fake(a), torch.Tensor)]
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    if len(tensors) != 1 or len(outputs) != 1:
        return f"the MLP reads {len(tensors)} tensors and leaves {len(outputs)} (a rewrite needs one of each)"
    (x,), (y,) = tensors, outputs
    if fake(y) is None or fake(x).shape != fake(y).shape:
        return "the MLP changes the width of the stream"
    sizes = {str(size) for size in fake(x).shape}
    unknown = [a.name for a in inputs if a is not x and str(a.meta.get("val")) not in sizes]
    if unknown:
        return f"the MLP reads sizes that are not its input's ({', '.join(unknown)})"
    return MLPSite(members, x, y)


def block_mlps(gm: torch.fx.GraphModule, analysis: GraphAnalysis, wanted: Callable[[int], bool], technique: str
               ) -> tuple[dict[int, tuple[str, MLPSite]], dict[str, str]]:
    """The MLP of every ``wanted`` block, labelled for a pass report ({block: (label, site)}), and why each
    other wanted block has none ({label: reason})."""
    if not analysis.blocks:
        raise DynasparseError(f"{technique} needs the model's block structure (indexed layers such as layers.0); "
                              "none was found in this graph")
    found, missing = {}, {}
    for block in analysis.blocks:
        if wanted(block.index):
            label = f"MLP of block {block.index} ({block.module})"
            site = find_mlp(gm, block.module)
            if isinstance(site, str):
                missing[label] = site
            else:
                found[block.index] = (label, site)
    return found, missing


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Data-flow graph keyed by FX node, edges from producer to user."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for user in node.users:
            graph.add_edge(node, user)
    return graph


def _is_causal_mask(mask: Node | None, graph: nx.DiGraph) -> bool:
    """A mask is causal when it derives from comparing two position ranges (or a tril/triu)."""
    if not isinstance(mask, Node):
        return False
    for node in nx.ancestors(graph, mask) | {mask}:
        if is_call(node, *_TRIANGLES):
            return True
        if is_call(node, *_POSITION_COMPARISONS):
            sides = [a for a in node.args[:2] if isinstance(a, Node)]
            if len(sides) == 2 and all(
                    any(is_call(n, aten.arange.default, aten.arange.start, aten.arange.start_step)
                        for n in nx.ancestors(graph, side) | {side}) for side in sides):
                return True
    return False


def _sites(gm: torch.fx.GraphModule, graph: nx.DiGraph) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if not is_call(node, ATTENTION, BLOCK_SPARSE_ATTENTION):
            continue
        args = bound_args(node)
        q, k = fake(args["q"]), fake(args["k"])
        path = block_path(node)
        modules = module_paths(node)
        sites.append(AttentionSite(
            index=len(sites), node=node, layer=layer_index(path), module=modules[-1] if modules else "",
            num_heads=int(q.shape[1]), num_kv_heads=int(k.shape[1]), head_dim=int(q.shape[-1]),
            causal=bool(args["is_causal"]) or _is_causal_mask(args["mask"], graph),
            has_mask=args["mask"] is not None, q_len=str(q.shape[-2]), kv_len=str(k.shape[-2]),
            example_shape=(hint(q.shape[0]), hint(q.shape[-2]), hint(k.shape[-2])),
            sparse=node.target is BLOCK_SPARSE_ATTENTION))
    if any(s.layer is None for s in sites):
        for site in sites:
            site.layer = site.index
    return sites


def _blocks(gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> list[Block]:
    paths: list[str] = []
    for site in sites:
        path = block_path(site.node)
        if path is None:
            return []
        if path not in paths:
            paths.append(path)
    members: dict[str, list[Node]] = {p: [] for p in paths}
    for node in gm.graph.nodes:
        enclosing = module_paths(node)
        for path in paths:
            if path in enclosing:
                members[path].append(node)
    blocks = []
    previous_output: Node | None = None
    for index, path in enumerate(paths):
        inside = set(members[path])
        leaving = [n for n in members[path] if any(u not in inside for u in n.users)]
        output = leaving[-1] if leaving else None
        block_input = previous_output
        if block_input is None and output is not None:
            feeding = [a for n in members[path] for a in n.all_input_nodes
                       if a not in inside and a.op != "get_attr" and fake(a) is not None
                       and fake(a).shape == fake(output).shape]
            block_input = feeding[-1] if feeding else None
        blocks.append(Block(index, path, [s.index for s in sites if block_path(s.node) == path],
                            block_input, output))
        previous_output = output
    return blocks


def _head_modules(gm: torch.fx.GraphModule, blocks: list[Block]) -> list[str]:
    """Modules that run after the last block (final norm, pooler, LM head), in order."""
    if not blocks or blocks[-1].output is None:
        return []
    block_paths = {b.module for b in blocks}
    seen: list[str] = []
    after = False
    for node in gm.graph.nodes:
        if node is blocks[-1].output:
            after = True
            continue
        if not after or node.op != "call_function":
            continue
        paths = module_paths(node)
        if block_paths.intersection(paths):
            continue
        # the shallowest module that is not a container of the blocks: "norm", "model.norm", "pooler"
        outer = next((p for p in paths if not any(b.startswith(p + ".") for b in block_paths)), None)
        if outer and outer not in seen:
            seen.append(outer)
    return seen


def analyze(gm: torch.fx.GraphModule) -> GraphAnalysis:
    graph = to_networkx(gm)
    sites = _sites(gm, graph)
    blocks = _blocks(gm, sites)
    return GraphAnalysis(sites, blocks, _head_modules(gm, blocks), graph)
