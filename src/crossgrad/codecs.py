"""Message codecs for the cross-gradient round, and error feedback as a stateful wrapper.

A codec turns a batch of flat rows [E, P] into a *payload*: a tuple of tensors, each with leading
dimension E, which is exactly what goes on the wire (bytes are counted from it), and decodes a
payload back to [E, P]. Codecs are stateless and work per parameter tensor, following the layout;
`ErrorFeedback(codec)` adds the sender-side memory, so any codec can use it.
"""
from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
from torch import Tensor

from crossgrad.errors import ConfigError
from crossgrad.flat import ParamLayout

Payload = tuple[Tensor, ...]


class Codec(Protocol):
    name: str

    def encode(self, rows: Tensor) -> Payload: ...

    def decode(self, payload: Payload, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """The rows [E, P] a payload carries, in `dtype` (into `out` if given)."""
        ...

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """decode(encode(rows)), computed directly (into `out` if given; it may be rows itself)."""
        ...

    def encode_roundtrip(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        """(encode(rows), roundtrip(rows)) sharing their work; `out` as in roundtrip."""
        ...


class Identity:
    """No compression: the payload is the rows themselves."""

    name = "identity"

    def encode(self, rows: Tensor) -> Payload:
        return (rows,)

    def decode(self, payload: Payload, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        return payload[0].to(dtype) if out is None else out.copy_(payload[0])

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        return rows if out is None else out.copy_(rows)

    def encode_roundtrip(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        return self.encode(rows), self.roundtrip(rows, out)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# Multiplying eight 0/1 bytes (read as one little-endian int64) by this constant gathers them into
# the top byte, first element in the most significant bit; the cross terms land below bit 56 or
# overflow away, and never carry into it.
_PACK_MAGIC = _as_int64(sum(1 << (63 - 9 * k) for k in range(8)))
# Replicating a byte into all eight and masking keeps bit 7-k in byte k: the inverse of the above.
_UNPACK_REPLICATE = 0x0101010101010101
_UNPACK_MASK = _as_int64(sum(1 << (7 - k) << (8 * k) for k in range(8)))
assert sys.byteorder == "little", "bit packing assumes a little-endian machine"


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor [E, m] into uint8 [E, ceil(m/8)], most significant bit first."""
    e, m = bits.shape
    pad = (-m) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    words = bits.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, m: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 [E, ceil(m/8)] -> bool [E, m]."""
    words = (packed.to(torch.int64) * _UNPACK_REPLICATE) & _UNPACK_MASK
    return words.view(torch.uint8).view(packed.shape[0], -1)[:, :m] != 0


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
        padded = [(k + 7) // 8 * 8 for k in layout.numels]
        starts = [sum(padded[:t]) for t in range(len(padded))]
        self._padded_slices = [slice(a, a + k) for a, k in zip(starts, layout.numels)]
        self._padded_size = sum(padded)

    def _scales(self, rows: Tensor) -> Tensor:
        """float32 [E, T]: mean absolute value of each tensor of each row."""
        # a loop of T contiguous-slice reductions beats segment_reduce and index_add on CPU
        return torch.stack([rows[:, s].abs().mean(1) for s in self._slices], 1).to(torch.float32)

    def encode(self, rows: Tensor) -> Payload:
        return self._pack(rows), self._scales(rows)

    def _pack(self, rows: Tensor) -> Tensor:
        if self._padded_size == rows.shape[1]:
            return pack_bits(torch.signbit(rows))
        # give every tensor a byte-aligned start
        negative = torch.zeros(rows.shape[0], self._padded_size, dtype=torch.bool, device=rows.device)
        for s, ps in zip(self._slices, self._padded_slices):
            torch.signbit(rows[:, s], out=negative[:, ps])
        return pack_bits(negative)

    def decode(self, payload: Payload, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        packed, scales = payload
        # copysign(scale, +-0.5) sets each sign without a (slow) masked select; in place: on big
        # messages a fresh block costs more in page faults than a second pass over it
        half = unpack_bits(packed, self._padded_size).to(dtype).neg_().add_(0.5)
        scales = scales.to(dtype)
        if out is None:
            out = torch.empty(packed.shape[0], self.layout.size, dtype=dtype, device=packed.device)
        for t, (s, ps) in enumerate(zip(self._slices, self._padded_slices)):
            torch.copysign(scales[:, t : t + 1], half[:, ps], out=out[:, s])
        return out

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """decode(encode(rows)) without packing: what the sender knows the receiver will see."""
        return self._signed(self._scales(rows), rows, out)

    def encode_roundtrip(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        scales = self._scales(rows)
        packed = self._pack(rows)  # before _signed, which may overwrite rows
        return (packed, scales), self._signed(scales, rows, out)

    def _signed(self, scales: Tensor, rows: Tensor, out: Tensor | None) -> Tensor:
        """Each tensor's scale with the sign of rows, into out (which may be rows)."""
        scales = scales.to(rows.dtype)
        out = torch.empty_like(rows) if out is None else out
        for t, s in enumerate(self._slices):
            torch.copysign(scales[:, t : t + 1], rows[:, s], out=out[:, s])
        return out

    def message_bytes(self) -> int:
        """Bytes per message: sum over tensors of ceil(numel / 8) + 4."""
        return sum((k + 7) // 8 + 4 for k in self.layout.numels)


CODECS = {"identity": lambda layout: Identity(), "sign": ScaledSign}


def make_codec(name: str, layout: ParamLayout) -> Codec:
    try:
        factory = CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(CODECS))}") from None
    return factory(layout)


class ErrorFeedback:
    """A codec with sender-side error memory, one row per message stream: c = C(e + g); e <- e + g - c.

    The memory rows are created by `init` (or on the first message, shaped like it) and live on the
    device and in the dtype of the rows they correct.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.memory: Tensor | None = None

    def init(self, rows_shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
             device: torch.device | str) -> None:
        self.memory = torch.zeros(tuple(rows_shape), dtype=dtype, device=device)

    def _correct(self, rows: Tensor) -> Tensor:
        """e + g, formed in the memory itself (no [E, P] temporary); `_keep_rest` completes the update."""
        if self.memory is None:
            self.init(rows.shape, rows.dtype, rows.device)
        elif self.memory.shape != rows.shape:
            raise ValueError(f"error feedback holds memory rows {tuple(self.memory.shape)}, "
                             f"got rows {tuple(rows.shape)}")
        return self.memory.add_(rows)

    def encode(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        """The payload to send and its decoded value c (what the receiver will see); updates the memory.

        c is written into `out` if given, which may be rows itself (they are not needed afterwards).
        """
        payload, decoded = self.codec.encode_roundtrip(self._correct(rows), out)
        return payload, self._keep_rest(decoded)

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """As `encode` for rows that never leave the agent (the self-gradient): no payload is built."""
        return self._keep_rest(self.codec.roundtrip(self._correct(rows), out))

    def _keep_rest(self, decoded: Tensor) -> Tensor:
        self.memory.sub_(decoded)  # e <- (e + g) - c
        return decoded

    def state_dict(self) -> dict[str, Any]:
        return {"memory": None if self.memory is None else self.memory.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = state["memory"]
        if theirs is None:
            self.memory = None
            return
        if self.memory is None:
            raise ValueError("error-feedback memory must be initialised (init) before a state is loaded")
        if theirs.shape != self.memory.shape:
            raise ValueError(f"error-feedback memory of shape {tuple(theirs.shape)} does not fit "
                             f"{tuple(self.memory.shape)}")
        self.memory.copy_(theirs)
