"""KIVI quantization of cached keys and values: what the compressed tier of the KV cache stores.

Keys are quantized **per channel** over a block of ``group`` tokens (a key channel's outliers persist across
tokens, so one scale per channel fits them), values **per token** over groups of ``group`` channels (a
value's error then stays inside its own token). Both are asymmetric min/max with ``bits`` in {2, 4, 8},
packed ``8 // bits`` codes to a byte along the last dimension; scales and minima are stored in fp16.

Error bound (``error_bound``): an element dequantizes within half its group's scale of the original, plus
the fp16 rounding of the scale and minimum it was coded against.
"""
from __future__ import annotations

import torch

BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16
FP16_STEP = 2.0 ** -24  # the smallest fp16 step: a scale below the smallest normal keeps that absolute precision


def check(bits: int, group: int, *dims: int) -> None:
    """Raise ValueError naming what is wrong when ``bits`` / ``group`` cannot code tensors of ``dims``."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; the compressed tier codes {list(BITS)} bits")
    if group < 1 or any(d % group for d in dims):
        raise ValueError(f"group={group} must divide the head dimensions {list(dims)} (values are coded per "
                         "group of channels); pick a divisor such as 32 or 16")


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., N] -> [..., N * bits / 8], the first code in the lowest bits."""
    per_byte = 8 // bits
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``_pack`` undone, as float32 codes (a scalar shift per code position: a broadcast tensor shift of
    uint8 is several times slower on CPU)."""
    if bits == 8:
        return packed.float()
    mask = (1 << bits) - 1
    codes = [packed & mask] + [(packed >> shift) & mask for shift in range(bits, 8, bits)]
    return torch.stack(codes, -1).flatten(-2).float()


def _code(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max codes of ``x`` over ``dim``: (codes uint8, scale, minimum), scale and minimum in
    fp16 with ``dim`` kept; codes are computed against the rounded scale and minimum."""
    x = x.float()
    low = x.amin(dim, keepdim=True)
    high = x.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).to(SCALE_DTYPE)
    low = low.to(SCALE_DTYPE)
    step = scale.float().clamp(min=FP16_STEP)  # a zero scale: every element is the minimum
    codes = ((x - low.float()) / step).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, low


def quantize_keys(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys [..., G, D] of one block of G tokens -> (packed [..., G, D * bits / 8], scale [..., D], minimum
    [..., D]): one scale per channel over the block's tokens."""
    codes, scale, low = _code(keys, -2, bits)
    return _pack(codes, bits), scale.squeeze(-2), low.squeeze(-2)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``quantize_keys`` undone: [..., G, D] in ``dtype``."""
    return torch.addcmul(low.float()[..., None, :], _unpack(packed, bits), scale.float()[..., None, :]).to(dtype)


def quantize_values(values: torch.Tensor, bits: int, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values [..., G, Dv] -> (packed [..., G, Dv * bits / 8], scale [..., G, Dv / group], minimum alike):
    one scale per token and group of ``group`` channels."""
    grouped = values.reshape(*values.shape[:-1], -1, group)
    codes, scale, low = _code(grouped, -1, bits)
    return _pack(codes.flatten(-2), bits), scale.squeeze(-1), low.squeeze(-1)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, group: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``quantize_values`` undone: [..., G, Dv] in ``dtype``."""
    codes = _unpack(packed, bits)
    codes = codes.reshape(*codes.shape[:-1], -1, group)
    return torch.addcmul(low.float()[..., None], codes, scale.float()[..., None]).flatten(-2).to(dtype)


def error_bound(scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """The most an element coded against ``scale`` / ``low`` can move: half a step, plus the fp16 rounding
    of the minimum and of the scale over the whole code range (relative, or one fp16 step where they are
    subnormal)."""
    eps, levels = torch.finfo(SCALE_DTYPE).eps, (1 << bits) - 1
    return (0.5 * scale.float() + eps * (low.float().abs() + levels * scale.float().abs())
            + (levels + 1) * FP16_STEP + 1e-6)
