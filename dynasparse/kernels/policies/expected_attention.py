"""Expected attention: the attention a Gaussian model of the next queries pays each key."""
from __future__ import annotations

import math

import torch

from dynasparse.kernels.policies.snapkv import SnapKVPolicy


class ExpectedAttentionPolicy(SnapKVPolicy):
    """Expected attention (Devoto et al. 2025, kvpress's ExpectedAttentionPress): the queries to come are
    modelled as a Gaussian fitted to the last ``window`` queries of the step; a key is worth the attention
    such a query pays it in expectation, exp(mu.k s + k'Sigma k s^2 / 2) normalised over the candidates,
    averaged over the group's query heads and weighted by the norm of its value (what it adds to the
    output). Every candidate is rescored each step, like SnapKV, but from a fit rather than the window's
    own attention, and with no attention weights. The site's queries carry RoPE already: the window's
    positions stand for the next ones (kvpress rotates pre-RoPE statistics forward instead)."""

    name = "expected_attention"
    uses_attention = False

    def update(self, step):
        batch, kv_heads, slots = step.positions.shape
        q_heads, length, dim = step.queries.shape[1:]
        queries = step.queries.float().view(batch, kv_heads, q_heads // kv_heads, length, dim)
        weights = step.observed / step.observed.sum(-1, keepdim=True).clamp(min=1e-9)  # [B, T]
        weights = weights[:, None, None, :, None]
        mean = (queries * weights).sum(3)  # [B, Hkv, G, D]
        keys = torch.cat([step.keys, step.new_keys], 2).float()[:, :, None]  # [B, Hkv, 1, S + T, D]
        logits = (keys @ mean[..., None]).squeeze(-1) * step.scale  # [B, Hkv, G, S + T]
        if length > 1:  # one query (a decode step) has no spread: skip the D x D term
            centred = queries - mean[:, :, :, None]
            covariance = (centred * weights).transpose(-2, -1) @ centred  # [B, Hkv, G, D, D]
            logits = logits + ((keys @ covariance) * keys).sum(-1) * (step.scale ** 2 / 2)
        # one set of candidates whatever the path: slots holding this step's tokens (a step may have written
        # them already) and padding stay out of the normalisation
        first_new = torch.where(step.new_positions >= 0, step.new_positions,
                                torch.iinfo(step.new_positions.dtype).max).amin(-1, keepdim=True)
        held = (step.positions >= 0) & (step.positions < first_new)
        candidate = torch.cat([held, step.new_positions >= 0], -1)[:, :, None]
        expected = logits.masked_fill(~candidate, -math.inf).softmax(-1).nan_to_num(0.0).mean(2)
        worth = expected * torch.cat([step.values, step.new_values], 2).float().norm(dim=-1)
        return worth[..., :slots], worth[..., slots:]
