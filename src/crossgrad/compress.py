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

    def roundtrip(self, rows: Tensor) -> Tensor:
        """decode(encode(rows)), computed directly."""
        ...


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

    def roundtrip(self, rows: Tensor) -> Tensor:
        return rows


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

    The bit sent is the float's sign bit. A 1-bit code has no zero, so an element that is exactly
    +0.0 is sent as +scale (-0.0 as -scale) where torch.sign would give 0; this is the only
    difference from the formula, and it is what the wire can carry. Each tensor's bits start on a
    byte boundary, so a message is sum(ceil(numel/8) + 4) bytes.
    """

    name = "sign"

    def __init__(self, layout: ParamLayout):
        self.layout = layout
        self._slices = layout.slices()
        numels = torch.tensor(layout.numels)
        self._numels = numels
        self._segments = layout.segment_ids()
        padded = (numels + 7) // 8 * 8
        # position in the padded bit stream of every element, and a gather map that fills the
        # padding bits from an extra always-false column at index P
        starts = torch.cumsum(padded, 0) - padded
        self._positions = torch.repeat_interleave(starts - torch.tensor(layout.offsets), numels) + torch.arange(
            layout.size
        )
        gather = torch.full((int(padded.sum()),), layout.size, dtype=torch.long)
        gather[self._positions] = torch.arange(layout.size)
        self._gather = gather
        self._device_cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                t.to(device) for t in (self._numels, self._segments, self._positions, self._gather)
            )
        return self._device_cache[device]

    def _scales(self, rows: Tensor) -> Tensor:
        """float32 [E, T]: mean absolute value of each tensor of each row."""
        # a loop of T contiguous-slice reductions beats segment_reduce and index_add on CPU
        return torch.stack([rows[:, s].abs().mean(1) for s in self._slices], 1).to(torch.float32)

    def _expand(self, scales: Tensor, dtype: torch.dtype) -> Tensor:
        numels, _, _, _ = self._on(scales.device)
        return scales.to(dtype).repeat_interleave(numels, dim=1)

    def encode(self, rows: Tensor) -> Payload:
        _, _, _, gather = self._on(rows.device)
        negative = torch.nn.functional.pad(torch.signbit(rows), (0, 1))
        return pack_bits(negative[:, gather]), self._scales(rows)

    def decode(self, payload: Payload, dtype: torch.dtype) -> Tensor:
        packed, scales = payload
        _, _, positions, _ = self._on(packed.device)
        negative = unpack_bits(packed, packed.shape[1] * 8)[:, positions]
        # copysign(scale, +-0.5) sets the sign without a (slow) masked select
        return torch.copysign(self._expand(scales, dtype), 0.5 - negative.to(dtype))

    def roundtrip(self, rows: Tensor) -> Tensor:
        """decode(encode(rows)) without packing: what the sender knows the receiver will see."""
        return torch.copysign(self._expand(self._scales(rows), rows.dtype), rows)

    def message_bytes(self) -> int:
        """Bytes per message: sum over tensors of ceil(numel / 8) + 4."""
        return sum((k + 7) // 8 + 4 for k in self.layout.numels)


COMPRESSORS = {"identity": lambda layout: Identity(), "sign": ScaledSign}


def make_compressor(name: str, layout: ParamLayout) -> Compressor:
    try:
        return COMPRESSORS[name](layout)
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; available: {sorted(COMPRESSORS)}") from None


def error_feedback(
    compressor: Compressor, rows: Tensor, memory: Tensor, send: bool = True
) -> tuple[Payload | None, Tensor]:
    """Compress rows + memory; update memory in place to what was not sent (e <- e + g - c).

    Returns the payload to send (None when `send` is false: a self-gradient never leaves the
    agent) and its decoded value c, what the receiver will see.
    """
    corrected = memory + rows
    payload = compressor.encode(corrected) if send else None
    decoded = compressor.roundtrip(corrected)
    torch.sub(corrected, decoded, out=memory)
    return payload, decoded
