"""Message codecs for the cross-gradient round, and error feedback as a stateful wrapper.

A codec turns a batch of flat rows [E, P] into a *payload*: a tuple of tensors, each with leading
dimension E, which is exactly what goes on the wire (bytes are counted from it), and decodes a
payload back to [E, P]. Codecs are stateless and work per parameter tensor, following the layout
(random-k's randomness is an input: which draw, set by the messages' owner);
`ErrorFeedback(codec)` adds the sender-side memory, so any codec can use it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
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
        """decode(encode(rows)), computed directly (into `out` if given; it may be rows itself).

        It must equal decode(encode(rows)) bit for bit: the in-process backend hands receivers the
        sender's roundtrip value instead of decoding the (still encoded and counted) message.
        """
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


#: the integer dtype of each float width, to read a float's bits (its sign bit is the integer's)
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _scratch(rows: Tensor, out: Tensor | None) -> Tensor | None:
    """`out` when it may serve as scratch space before it receives the result: a block of its own."""
    if out is None or out.shape != rows.shape or out.dtype != rows.dtype:
        return None
    return None if out.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr() else out


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor [E, m] into uint8 [E, ceil(m/8)], most significant bit first."""
    if bits.device.type == "cpu":  # numpy's packbits is one SIMD pass: ~15x faster than the integer trick
        return torch.from_numpy(np.packbits(bits.numpy(), axis=1))
    return _pack_bits_torch(bits)


def unpack_bits(packed: Tensor, m: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 [E, ceil(m/8)] -> bool [E, m]."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=m)).view(torch.bool)
    return _unpack_bits_torch(packed, m)


def _pack_bits_torch(bits: Tensor) -> Tensor:
    """pack_bits on any device, in torch operations (the path CUDA takes; tested equal on CPU)."""
    e, m = bits.shape
    pad = (-m) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    words = bits.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)


def _unpack_bits_torch(packed: Tensor, m: int) -> Tensor:
    """unpack_bits on any device, in torch operations."""
    words = (packed.to(torch.int64) * _UNPACK_REPLICATE) & _UNPACK_MASK
    return words.view(torch.uint8).view(packed.shape[0], -1)[:, :m] != 0


def _sign_bits(rows: Tensor, out: Tensor) -> None:
    """out <- rows' sign bits (the integer's: comparing the bits as integers with 0 is signbit, 25 % faster
    than torch.signbit; numpy's comparison is 3x faster again on CPU)."""
    bits = rows.view(_SAME_WIDTH_INT[rows.element_size()])
    if rows.device.type == "cpu":
        np.less(bits.numpy(), 0, out=out.numpy())
    else:
        torch.lt(bits, 0, out=out)


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
        self._negative: Tensor | None = None  # scratch for the sign bits, see _pack

    def _scales(self, rows: Tensor, scratch: Tensor | None = None) -> Tensor:
        """float32 [E, T]: mean absolute value of each tensor of each row.

        With a scratch block shaped like rows (about to be overwritten anyway), |rows| is formed there
        in one pass and summed per tensor: on CPU that is twice as fast as a temporary per tensor.
        """
        if scratch is None:
            # a loop of T contiguous-slice reductions beats segment_reduce and index_add on CPU
            return torch.stack([rows[:, s].abs().mean(1) for s in self._slices], 1).to(torch.float32)
        torch.abs(rows, out=scratch)
        return torch.stack([scratch[:, s].sum(1) / (s.stop - s.start) for s in self._slices], 1).to(torch.float32)

    def encode(self, rows: Tensor) -> Payload:
        return self._pack(rows), self._scales(rows)

    def _pack(self, rows: Tensor) -> Tensor:
        negative = self._negative
        if negative is None or negative.shape[0] != rows.shape[0] or negative.device != rows.device:
            # kept across calls: a fresh block of this size costs as much in page faults as the comparison;
            # the padding bits stay False (only the tensors' own slices are written)
            negative = torch.zeros(rows.shape[0], self._padded_size, dtype=torch.bool, device=rows.device)
            self._negative = negative
        if self._padded_size == rows.shape[1]:
            _sign_bits(rows, negative)
        else:  # give every tensor a byte-aligned start
            for s, ps in zip(self._slices, self._padded_slices):
                _sign_bits(rows[:, s], negative[:, ps])
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
        return self._signed(self._scales(rows, _scratch(rows, out)), rows, out)

    def encode_roundtrip(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        scales = self._scales(rows, _scratch(rows, out))
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


#: the fraction of each parameter tensor's entries that top-k and random-k keep unless told otherwise
#: (the 1 % of Koloskova et al.'s experiments)
DEFAULT_RATIO = 0.01


def kept_per_tensor(numels: tuple[int, ...], ratio: float) -> list[int]:
    """How many entries a sparse codec keeps of each tensor: ratio * numel rounded half up, at least one."""
    return [min(k, max(1, math.floor(ratio * k + 0.5))) for k in numels]


class _Sparse:
    """What top-k and random-k share: they keep k_l entries of every parameter tensor l (see kept_per_tensor).

    Per tensor, not per row, so that every layer is updated at every step whatever the scale of its
    values (a row-wide top-k could starve small-valued layers). The payload is (int32 positions in the
    row [E, K], values [E, K] in the rows' dtype), K = sum_l k_l, positions ascending; decoding
    scatters the values into zeros. A message is K * (4 + element size) bytes.
    """

    name = ""

    def __init__(self, layout: ParamLayout, ratio: float = DEFAULT_RATIO):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"the {self.name} codec's ratio (the fraction of entries kept) must be in (0, 1], "
                              f"not {ratio!r}")
        if layout.size >= 1 << 31:
            raise ConfigError(f"the {self.name} codec sends int32 positions: a model of {layout.size} parameters "
                              "is too large for it")
        self.layout = layout
        self.ratio = float(ratio)
        self._slices = layout.slices()
        self._kept = kept_per_tensor(layout.numels, self.ratio)
        self.kept = sum(self._kept)

    def _scorer(self, rows: Tensor) -> Callable[[slice], Tensor]:
        """The scores [E, numel] of a tensor's slice of the rows: the k_l highest of each row are kept."""
        raise NotImplementedError

    def _positions(self, rows: Tensor) -> Tensor:
        """int64 [E, K]: the kept positions of every row, ascending."""
        scores = self._scorer(rows)
        parts = []
        for s, k in zip(self._slices, self._kept):
            if k == s.stop - s.start:
                parts.append(torch.arange(s.start, s.stop, device=rows.device).expand(len(rows), -1))
                continue
            chosen = scores(s).topk(k, dim=1, sorted=False).indices
            parts.append(chosen.sort(dim=1).values.add_(s.start))
        return torch.cat(parts, 1)

    def encode(self, rows: Tensor) -> Payload:
        positions = self._positions(rows)
        return positions.to(torch.int32), rows.gather(1, positions)

    def decode(self, payload: Payload, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        positions, values = payload
        if out is None:
            out = torch.zeros(len(positions), self.layout.size, dtype=dtype, device=positions.device)
        else:
            out.zero_()
        return out.scatter_(1, positions.long(), values.to(dtype))

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        return self.encode_roundtrip(rows, out)[1]

    def encode_roundtrip(self, rows: Tensor, out: Tensor | None = None) -> tuple[Payload, Tensor]:
        payload = self.encode(rows)  # the values are gathered before `out` (possibly rows) is cleared
        return payload, self.decode(payload, rows.dtype, out)

    def message_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes per message of rows in `dtype`: K int32 positions and K values."""
        return self.kept * (4 + torch.finfo(dtype).bits // 8)


class TopK(_Sparse):
    """Keeps the k_l largest-magnitude entries of every parameter tensor (ties: whichever topk picks)."""

    name = "top-k"

    def _scorer(self, rows: Tensor) -> Callable[[slice], Tensor]:
        return lambda s: rows[:, s].abs()


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# Integer hash finalisers in signed arithmetic, whose products wrap around: splitmix64's (Steele, Lea
# and Flood 2014) and MurmurHash3's fmix32. Each step (xor with a logical right shift, product with
# an odd constant) is a bijection, so each is one; outputs look independent and uniform even for
# consecutive inputs, and being integer operations they give the same bits on every device.
_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX64 = ((30, _as_int64(0xBF58476D1CE4E5B9)), (27, _as_int64(0x94D049BB133111EB)), (31, 1))
_MIX32 = ((16, _as_int32(0x85EBCA6B)), (13, _as_int32(0xC2B2AE35)), (16, 1))


def _mix(z: Tensor, steps: tuple[tuple[int, int], ...], bits: int) -> Tensor:
    for shift, factor in steps:
        z.bitwise_xor_((z >> shift).bitwise_and_((1 << (bits - shift)) - 1))  # a logical shift
        if factor != 1:
            z.mul_(factor)
    return z


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser of every element of an int64 tensor, in place."""
    return _mix(z, _MIX64, 64)


def fmix32(z: Tensor) -> Tensor:
    """MurmurHash3's finaliser of every element of an int32 tensor, in place (a third of mix64's cost on CPU)."""
    return _mix(z, _MIX32, 32)


class RandomK(_Sparse):
    """Keeps k_l entries of every parameter tensor drawn uniformly at random, without replacement.

    The positions of a row depend on (seed, draw, the row's stream) only, never on the values: a
    stream is a global name of the message's sender (e.g. its agent, or its edge), given by `streams`
    (default: the row's position in the batch), and `draw` is set by whoever owns the messages, to
    a new number for every batch (ErrorFeedback counts its batches; Choco its steps). The codec
    itself stays a pure function: encoding the same rows twice gives the same message. So the
    simulator and every rank of a torch.distributed run draw the same positions for the same
    agent, on any device, and a resumed run (whose owner restores its count) draws what an
    uninterrupted one would. Row r keeps, of each tensor, the k_l positions p with the highest
    score fmix32((p xor a_r) * b_r) (32-bit arithmetic), where a_r and b_r (odd) are the low and high
    31 bits of key_r = mix64(mix64(seed, draw) + stream_r * golden). The score is a bijection of p,
    so no two positions tie and every device keeps the same ones; the product decorrelates keys
    that differ in a few low bits. The positions travel with the values (int32 each): receivers
    need not re-draw them.
    """

    name = "random-k"

    def __init__(self, layout: ParamLayout, ratio: float = DEFAULT_RATIO, seed: int = 0,
                 streams: Tensor | None = None):
        super().__init__(layout, ratio)
        self.seed = int(seed)
        self.streams = streams
        self.draw = 0

    def _scorer(self, rows: Tensor) -> Callable[[slice], Tensor]:
        streams = self.streams
        if streams is None:
            streams = torch.arange(len(rows), device=rows.device)
        elif len(streams) != len(rows):
            raise ValueError(f"random-k was given {len(streams)} streams but encodes {len(rows)} rows")
        base = mix64(torch.tensor([self.seed, self.draw], dtype=torch.int64, device=rows.device))
        base = mix64(base[:1] * _GOLDEN + base[1:])
        keys = mix64(streams.to(device=rows.device, dtype=torch.int64) * _GOLDEN + base).unsqueeze(1)
        low = (keys & 0x7FFFFFFF).to(torch.int32)
        odd = ((keys >> 32) & 0x7FFFFFFF | 1).to(torch.int32)

        def scores(s: slice) -> Tensor:
            at = torch.arange(s.start, s.stop, dtype=torch.int32, device=rows.device)
            return fmix32(torch.bitwise_xor(at, low).mul_(odd))

        return scores


CODECS = {"identity": lambda layout: Identity(), "sign": ScaledSign, "top-k": TopK, "random-k": RandomK}
#: the codecs that keep a fraction of the entries (they take a ratio)
SPARSE_CODECS = ("top-k", "random-k")


def make_codec(name: str, layout: ParamLayout, ratio: float | None = None, streams: Tensor | None = None) -> Codec:
    """The codec `name` for rows of `layout`. ratio: the fraction of entries a sparse codec keeps
    (default DEFAULT_RATIO); streams: the global name of each row's sender, for random-k's draws
    (see RandomK), ignored by the deterministic codecs."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(CODECS))}") from None
    if name not in SPARSE_CODECS:
        if ratio is not None:
            raise ConfigError(f"the {name} codec keeps every entry: it takes no ratio")
        return factory(layout)
    options: dict[str, Any] = {} if ratio is None else {"ratio": ratio}
    return RandomK(layout, streams=streams, **options) if factory is RandomK else factory(layout, **options)


class ErrorFeedback:
    """A codec with sender-side error memory, one row per message stream: c = C(e + g); e <- e + g - c.

    The memory rows are created by `init` (or on the first message, shaped like it) and live on the
    device and in the dtype of the rows they correct.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.memory: Tensor | None = None
        #: batches encoded so far: a random codec's draw (see RandomK), so that each batch draws anew
        self.count = 0

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
        self._next_draw()
        payload, decoded = self.codec.encode_roundtrip(self._correct(rows), out)
        return payload, self._keep_rest(decoded)

    def roundtrip(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """As `encode` for rows that never leave the agent (the self-gradient): no payload is built."""
        self._next_draw()
        return self._keep_rest(self.codec.roundtrip(self._correct(rows), out))

    def _next_draw(self) -> None:
        if isinstance(self.codec, RandomK):
            self.codec.draw = self.count
        self.count += 1

    def _keep_rest(self, decoded: Tensor) -> Tensor:
        self.memory.sub_(decoded)  # e <- (e + g) - c
        return decoded

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"memory": None if self.memory is None else self.memory.clone()}
        if isinstance(self.codec, RandomK):  # the next draw (deterministic codecs need no count)
            state["count"] = self.count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
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
