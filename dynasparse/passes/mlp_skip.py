"""MLP skipping: a learned router per block decides, per token, whether the token runs the block's MLP.

    h → attention → h' → [router(x) ? MLP(x) : adapter(x)] → h' + ·      (x = the MLP's normed input)

Attention still runs for every token, so the KV cache stays whole; only the MLP's token-work shrinks
(FlexiDepth, Mixture-of-Depths, router tuning). A router is a linear map of the MLP's input to one logit
per token, the adapter a low-rank map standing in for the MLP on skipped tokens; both start as the
identity (every token kept), and ``dynasparse.fit`` trains them on a frozen model. The MLP moves into a
``RoutedMLP`` submodule of the graph, whose parameters are ordinary tensors that compile and export carry.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.fx import Node

from dynasparse.config import BaseConfig, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis, block_mlps
from dynasparse.ir.nodes import copy_meta, fake
from dynasparse.ir.ops import TOKEN_ROUTE
from dynasparse.kernels.mlp_skip import KEEP_ALL, adapter, routed, router_logits
from dynasparse.passes.fitted import load_fitted, save_fitted
from dynasparse.plans import MLP_SKIP_META, MLPSkipPlan
from dynasparse.registry import PassResult

@config_type
@dataclasses.dataclass
class MLPSkipConfig(BaseConfig):
    """Per-token MLP skipping behind learned routers (FlexiDepth / Mixture-of-Depths).

    ``target_skip``: the share of MLP token-work ``dynasparse.fit`` trains the routers to skip, over every
    routed block (blocks may skip more or less). ``adapter_rank``: rank of the map that stands in for the
    MLP on skipped tokens (0: skipped tokens get nothing). ``fitted``: a file ``dynasparse.fit`` saved
    (safetensors, with a JSON beside it); without it the routers keep every token. ``layers``: the blocks
    to route (default: all).
    """

    target_skip: float = 0.25
    adapter_rank: int = 16
    fitted: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_range("target_skip", 0.0, 1.0, low_open=True, high_open=True)
        self.check_int("adapter_rank", 0)
        self.check_fitted("routers keep every token")


class RoutedMLP(torch.nn.Module):
    """A block's MLP behind its router and adapter. ``dense``: run the MLP for every token, ignoring the
    router (the teacher ``fit`` distills from). ``fitting``: the router's decision is hard in the forward
    pass and soft (sigmoid) in the backward pass, every token runs the MLP, and each call appends its share
    of kept tokens to ``kept`` for ``fit``'s rate penalty. Both are off for inference."""

    def __init__(self, mlp: torch.fx.GraphModule, width: int, rank: int, seed: int):
        super().__init__()
        self.mlp = mlp
        self.router_weight = torch.nn.Parameter(torch.zeros(width))
        self.router_bias = torch.nn.Parameter(torch.tensor(KEEP_ALL))
        generator = torch.Generator().manual_seed(seed)  # LoRA's start: a random down map, a zero up map
        self.adapter_down = torch.nn.Parameter(torch.randn(width, rank, generator=generator) / width ** 0.5)
        self.adapter_up = torch.nn.Parameter(torch.zeros(rank, width))
        self.dense = self.fitting = False
        self.kept: list[torch.Tensor] = []

    def fitted_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"router_weight": self.router_weight, "router_bias": self.router_bias,
                "adapter_down": self.adapter_down, "adapter_up": self.adapter_up}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.mlp(x)
        if self.fitting:
            soft = torch.sigmoid(router_logits(x, self.router_weight, self.router_bias))
            gate = (soft > 0.5).float() + soft - soft.detach()  # straight-through
            self.kept.append(gate.mean())
            gate = gate[..., None].to(x.dtype)
            return gate * self.mlp(x) + (1 - gate) * adapter(x, self.adapter_down, self.adapter_up)
        keep = TOKEN_ROUTE(x, self.router_weight, self.router_bias)
        return routed(self.mlp, x, keep, self.adapter_down, self.adapter_up)


def routed_mlps(gm: torch.fx.GraphModule) -> dict[str, RoutedMLP]:
    return {name: module for name, module in gm.named_modules() if isinstance(module, RoutedMLP)}


def _fitted(gm: torch.fx.GraphModule) -> dict[str, dict[str, torch.Tensor]]:
    return {name: dict(gate.fitted_parameters()) for name, gate in routed_mlps(gm).items()}


def save_mlp_gates(gm: torch.fx.GraphModule, path: str | Path) -> Path:
    """Write the routers' and adapters' fitted parameters (safetensors, the layout in a JSON beside it)."""
    return save_fitted(path, _fitted(gm), gm.meta[MLP_SKIP_META].config)


class MLPSkipPass:
    name = "mlp_skip"

    def __init__(self, config: MLPSkipConfig):
        self.config = config

    # -- find sites: ir.analysis.block_mlps ------------------------------------------------------------------
    @staticmethod
    def _size_of(x: Node, placeholder: Node, size: Node, graph: torch.fx.Graph) -> Node:
        """``size`` (a symbolic size the MLP reads, e.g. the batch) as the matching dimension of its input:
        the routed MLP runs on the kept tokens, whose sizes are not the graph's."""
        dim = {str(s): d for d, s in enumerate(fake(x).shape)}[str(size.meta["val"])]
        return graph.call_function(torch.ops.aten.sym_size.int, (placeholder, dim))

    # -- rewrite ----------------------------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        result = PassResult(self.name)
        sites, result.left_dense = block_mlps(gm, analysis, self.config.applies_to, "MLP skipping")
        plan = MLPSkipPlan(self.config, {})
        for block, (label, site) in sites.items():
            plan.modules[block] = self._route(gm, block, site.members, site.input, site.output)
            result.applied.append(label)
        if not plan.modules:
            raise DynasparseError("no MLP could be routed: " + "; ".join(f"{k}: {v}" for k, v in
                                                                         result.left_dense.items()))
        result.num_matches = len(plan.modules)
        gm.meta[MLP_SKIP_META] = plan
        if self.config.fitted is not None:
            load_fitted(self.config.fitted, _fitted(gm))
        else:
            result.notes.append("mlp_skip: routers keep every token until dynasparse.fit trains them")
        gm.graph.lint()
        gm.recompile()
        return result

    def _route(self, gm: torch.fx.GraphModule, block: int, members: list[Node], x: Node, y: Node) -> str:
        """Move the MLP's nodes into a ``RoutedMLP`` submodule called on ``x`` in their place."""
        graph = torch.fx.Graph()
        env = {x: graph.placeholder("x")}
        for node in members:
            for a in node.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = graph.get_attr(a.target)
                elif a not in env and a not in members:
                    env[a] = self._size_of(x, env[x], a, graph)
            env[node] = graph.node_copy(node, lambda a: env[a])
        graph.output(env[y])
        width = fake(x).shape[-1]
        name = f"mlp_skip_{block}"
        gm.add_submodule(name, RoutedMLP(torch.fx.GraphModule(gm, graph), width, self.config.adapter_rank, block)
                         .to(device=fake(x).device if fake(x).device.type != "meta" else "cpu"))
        with gm.graph.inserting_before(y):
            call = gm.graph.call_module(name, (x,))
        copy_meta(y, call)
        y.replace_all_uses_with(call)
        for node in reversed(members):
            gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        return name
