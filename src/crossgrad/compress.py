"""Message compressors for the cross-gradient round.

A compressor turns a batch of flat rows [E, P] into a *payload*: a tuple of tensors, each with
leading dimension E, which is exactly what goes on the wire (bytes are counted from it), and
decodes a payload back to [E, P]. Compression is per parameter tensor, following the layout.
Error feedback (sender-side memory) is a separate function so any compressor can use it.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from crossgrad.flat import ParamLayout

Payload = tuple[Tensor, ...]


class Compressor(Protocol):
    name: str

    def encode(self, rows: Tensor) -> Payload: ...

    def decode(self, payload: Payload, dtype: torch.dtype) -> Tensor: ...


def payload_row_bytes(payload: Payload) -> int:
    """Bytes one row of a payload occupies on the wire."""
    return sum(t[0].numel() * t.element_size() for t in payload) if payload[0].shape[0] else 0


class Identity:
    """No compression: the payload is the rows themselves."""

    name = "identity"

    def encode(self, rows: Tensor) -> Payload:
        return (rows,)

    def decode(self, payload: Payload, dtype: torch.dtype) -> Tensor:
        return payload[0].to(dtype)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor [E, m] into uint8 [E, ceil(m/8)], most significant bit first."""
    e, m = bits.shape
    pad = (-m) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.reshape(e, -1, 8).to(torch.uint8)
    return (grouped * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, m: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 [E, ceil(m/8)] -> bool [E, m]."""
    e = packed.shape[0]
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(e, -1)[:, :m]


class ScaledSign:
    """C(v) = (||v||_1 / numel(v)) * sign(v) per parameter tensor: 1 bit per element + a float32 scale.

    A 1-bit code has no zero, so an element that is exactly 0 is sent as +scale (torch.sign would
    give 0); this is the only difference from the formula and it is what the wire can carry.
    """

    name = "sign"

    def __init__(self, layout: ParamLayout):
        self.layout = layout
        self._slices = layout.slices()

    def encode(self, rows: Tensor) -> Payload:
        bits = torch.cat([pack_bits(rows[:, s] < 0) for s in self._slices], dim=1)
        scales = torch.stack([rows[:, s].abs().mean(dim=1) for s in self._slices], dim=1)
        return bits, scales.to(torch.float32)

    def decode(self, payload: Payload, dtype: torch.dtype) -> Tensor:
        packed, scales = payload
        out = torch.empty(packed.shape[0], self.layout.size, dtype=dtype, device=packed.device)
        start = 0
        for t, (s, numel) in enumerate(zip(self._slices, self.layout.numels)):
            nbytes = (numel + 7) // 8
            negative = unpack_bits(packed[:, start : start + nbytes], numel)
            start += nbytes
            scale = scales[:, t : t + 1].to(dtype)
            out[:, s] = torch.where(negative, -scale, scale)
        return out

    def message_bytes(self) -> int:
        """Bytes per message: sum over tensors of ceil(numel / 8) + 4."""
        return sum((k + 7) // 8 + 4 for k in self.layout.numels)


COMPRESSORS = {"identity": lambda layout: Identity(), "sign": ScaledSign}


def make_compressor(name: str, layout: ParamLayout) -> Compressor:
    try:
        return COMPRESSORS[name](layout)
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; available: {sorted(COMPRESSORS)}") from None


def error_feedback(compressor: Compressor, rows: Tensor, memory: Tensor) -> tuple[Payload, Tensor]:
    """Compress rows + memory; update memory in place to what was not sent (e <- e + g - c).

    Returns the payload to send and its decoded value c (what the receiver will see).
    """
    corrected = memory + rows
    payload = compressor.encode(corrected)
    decoded = compressor.decode(payload, rows.dtype)
    torch.sub(corrected, decoded, out=memory)
    return payload, decoded
