import math

import pytest
import torch

import crossgrad as cg
from crossgrad.codecs import (
    CODECS,
    ErrorFeedback,
    Identity,
    RandomK,
    ScaledSign,
    TopK,
    _pack_bits_torch,
    _unpack_bits_torch,
    make_codec,
    pack_bits,
    unpack_bits,
)
from crossgrad.flat import ParamLayout


def layout_of(*sizes):
    model = torch.nn.Module()
    for k, s in enumerate(sizes):
        model.register_parameter(f"p{k}", torch.nn.Parameter(torch.zeros(s)))
    return ParamLayout.of(model)


def test_pack_unpack_roundtrip_odd_lengths():
    g = torch.Generator().manual_seed(0)
    for m in (1, 7, 8, 9, 63, 100):
        bits = torch.rand(3, m, generator=g) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(m / 8))
        assert torch.equal(unpack_bits(packed, m), bits)


def test_pack_bits_wire_format_is_msb_first():
    bits = torch.tensor([[True, False, False, False, False, False, False, True, True]])
    assert pack_bits(bits).tolist() == [[0b10000001, 0b10000000]]
    assert _pack_bits_torch(bits).tolist() == [[0b10000001, 0b10000000]]


def test_torch_bit_packing_matches_numpy_path():
    """CPU packs with numpy, other devices with torch operations: both give the same wire bytes."""
    g = torch.Generator().manual_seed(1)
    for m in (1, 7, 8, 9, 63, 100, 1001):
        bits = torch.rand(5, m, generator=g) < 0.5
        packed = pack_bits(bits)
        assert torch.equal(_pack_bits_torch(bits), packed)
        assert torch.equal(_unpack_bits_torch(packed, m), unpack_bits(packed, m))


def test_scaled_sign_matches_formula_per_tensor():
    layout = layout_of(5, 11, 3)
    comp = ScaledSign(layout)
    rows = torch.randn(4, layout.size, dtype=torch.float64)
    rows[0, 2] = 0.0
    decoded = comp.decode(comp.encode(rows), torch.float64)
    for s in layout.slices():
        v = rows[:, s]
        scale = (v.abs().sum(1, keepdim=True) / v.shape[1]).float().double()
        expected = torch.where(v < 0, -scale, scale)  # exact zeros are sent as +scale
        assert torch.equal(decoded[:, s], expected)
    assert decoded[0, 2] > 0


def test_payload_bytes_are_one_bit_per_element_plus_float32_scale():
    layout = layout_of(5, 11, 3, 64)
    comp = ScaledSign(layout)
    bits, scales = comp.encode(torch.randn(2, layout.size))
    per_row = bits[0].numel() * bits.element_size() + scales[0].numel() * scales.element_size()
    assert per_row == comp.message_bytes() == sum(math.ceil(k / 8) + 4 for k in (5, 11, 3, 64))


def test_error_feedback_keeps_what_was_not_sent():
    layout = layout_of(6, 4)
    ef = ErrorFeedback(ScaledSign(layout))
    g = torch.randn(2, layout.size, dtype=torch.float64)
    total_sent = torch.zeros_like(g)
    for _ in range(50):
        _, c = ef.encode(g)
        total_sent += c
    # sent + memory == everything fed in, exactly the error-feedback invariant
    torch.testing.assert_close(total_sent + ef.memory, 50 * g)
    assert ef.memory.abs().max() < g.abs().max() * 10


def test_error_feedback_payload_decodes_to_what_the_sender_kept():
    layout = layout_of(9, 3)
    codec = ScaledSign(layout)
    sender, quiet = ErrorFeedback(codec), ErrorFeedback(codec)
    for dtype in (torch.float32, torch.float64):
        sender.init((3, layout.size), dtype, "cpu")
        quiet.init((3, layout.size), dtype, "cpu")
        for _ in range(3):
            g = torch.randn(3, layout.size, dtype=dtype)
            payload, c = sender.encode(g)
            assert torch.equal(codec.decode(payload, dtype), c)
            assert torch.equal(quiet.roundtrip(g), c)  # the no-send variant: same value, same memory
            assert torch.equal(quiet.memory, sender.memory)


def test_error_feedback_memory_is_created_on_first_use_and_checked():
    layout = layout_of(4)
    ef = ErrorFeedback(ScaledSign(layout))
    assert ef.memory is None
    ef.encode(torch.ones(2, 4, dtype=torch.float64))
    assert ef.memory.shape == (2, 4) and ef.memory.dtype == torch.float64
    with pytest.raises(ValueError, match="memory rows"):
        ef.encode(torch.ones(3, 4, dtype=torch.float64))


def test_error_feedback_state_is_a_snapshot_and_loads_onto_its_dtype():
    layout = layout_of(5, 7)
    ef = ErrorFeedback(ScaledSign(layout))
    ef.init((2, layout.size), torch.float64, "cpu")
    ef.encode(torch.randn(2, layout.size, dtype=torch.float64))
    state = ef.state_dict()
    saved = state["memory"].clone()
    ef.encode(torch.randn(2, layout.size, dtype=torch.float64))
    assert torch.equal(state["memory"], saved)  # not a live reference to the memory
    other = ErrorFeedback(ScaledSign(layout))
    other.init((2, layout.size), torch.float64, "cpu")
    other.load_state_dict({"memory": saved.float()})
    assert other.memory.dtype == torch.float64
    torch.testing.assert_close(other.memory, saved.float().double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"memory": torch.zeros(3, layout.size)})


def test_make_codec_by_name():
    layout = layout_of(3)
    assert isinstance(make_codec("sign", layout), ScaledSign)
    assert isinstance(make_codec("identity", layout), Identity)
    assert isinstance(make_codec("top-k", layout), TopK)
    assert isinstance(make_codec("random-k", layout), RandomK)
    with pytest.raises(cg.ConfigError, match="unknown codec 'topk'; available: identity, random-k, sign, top-k"):
        make_codec("topk", layout)


def test_identity_roundtrip():
    rows = torch.randn(3, 7)
    assert torch.equal(Identity().decode(Identity().encode(rows), rows.dtype), rows)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_roundtrip_equals_decode_of_encode(name):
    """Bit for bit, into a fresh block, a given one (used as scratch first) or the rows themselves:
    the in-process backend hands receivers the sender's roundtrip value instead of decoding."""
    layout = layout_of(5, 11, 3, 64, 1)
    comp = make_codec(name, layout)
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(7, layout.size, dtype=dtype, generator=torch.Generator().manual_seed(3))
        rows[:, ::5] = 0.0
        rows[:, 1::7] = -0.0
        expected = comp.decode(comp.encode(rows), dtype)
        assert torch.equal(comp.roundtrip(rows), expected)
        out = torch.full_like(rows, float("nan"))
        assert torch.equal(comp.roundtrip(rows, out=out), expected) and torch.equal(out, expected)
        payload, decoded = comp.encode_roundtrip(rows.clone(), out=torch.empty_like(rows))
        assert torch.equal(decoded, expected)
        assert torch.equal(comp.decode(payload, dtype), expected)
        in_place = rows.clone()
        assert torch.equal(comp.roundtrip(in_place, out=in_place), expected)


# -- top-k and random-k ----------------------------------------------------------------------------

def test_top_k_keeps_the_largest_magnitudes_of_every_tensor():
    layout = layout_of(10, 4, 1)
    codec = TopK(layout, ratio=0.3)  # keeps 3, 1 (1.2 rounded) and 1 (at least one) entries
    rows = torch.randn(5, layout.size, dtype=torch.float64)
    positions, values = codec.encode(rows)
    assert positions.dtype == torch.int32 and positions.shape == values.shape == (5, 5)
    decoded = codec.decode((positions, values), torch.float64)
    for s, k in zip(layout.slices(), (3, 1, 1)):
        part = rows[:, s]
        threshold = part.abs().topk(k, dim=1).values[:, -1:]
        assert torch.equal(decoded[:, s], torch.where(part.abs() >= threshold, part, torch.zeros_like(part)))
    assert torch.all(positions.diff(dim=1) > 0)  # ascending: a canonical message


def test_random_k_draws_distinct_positions_per_tensor_whatever_the_values():
    layout = layout_of(50, 7, 3)
    codec = RandomK(layout, ratio=0.2)  # 10, 1 and 1 entries
    rows = torch.randn(6, layout.size)
    positions, values = codec.encode(rows)
    assert positions.shape == (6, 12)
    for s, k, at in zip(layout.slices(), (10, 1, 1), (0, 10, 11)):
        mine = positions[:, at:at + k].long()
        assert torch.all((mine >= s.start) & (mine < s.stop))
        assert all(len(set(r.tolist())) == k for r in mine)
    assert torch.equal(values, rows.gather(1, positions.long()))
    again = RandomK(layout, ratio=0.2)
    assert torch.equal(again.encode(torch.zeros_like(rows))[0], positions)  # the draw ignores the values
    again.draw = 1
    assert not torch.equal(again.encode(rows)[0], positions)  # another draw differs
    assert len({tuple(r.tolist()) for r in positions}) == 6  # and so do the rows' streams


def test_random_k_draws_by_stream_so_any_subset_of_rows_draws_alike():
    """A rank encoding only its own agents' rows draws what the simulator draws for them."""
    layout = layout_of(40, 9)
    rows = torch.randn(5, layout.size, dtype=torch.float64)
    everyone = make_codec("random-k", layout, ratio=0.25, streams=torch.arange(5))
    some = make_codec("random-k", layout, ratio=0.25, streams=torch.tensor([3, 1]))
    for draw in range(3):
        everyone.draw = some.draw = draw
        all_pos, _ = everyone.encode(rows)
        some_pos, _ = some.encode(rows[[3, 1]])
        assert torch.equal(some_pos, all_pos[[3, 1]])


def test_random_k_is_uniform_over_positions():
    layout = layout_of(20)
    codec = RandomK(layout, ratio=0.25)
    counts = torch.zeros(20)
    for draw in range(400):
        codec.draw = draw
        positions, _ = codec.encode(torch.zeros(8, 20))
        counts += torch.bincount(positions.long().flatten(), minlength=20)
    expected = 400 * 8 * 5 / 20  # 800 per position
    assert torch.all((counts - expected).abs() < 5 * math.sqrt(expected)), counts


def test_mix64_is_splitmix64():
    from crossgrad.codecs import mix64

    def reference(z):
        mask = (1 << 64) - 1
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, 2, 12345, -5, 2**62 + 7, -(2**63)]
    got = mix64(torch.tensor(values, dtype=torch.int64))
    assert [int(v) & ((1 << 64) - 1) for v in got] == [reference(v) for v in values]


def test_fmix32_is_murmur3s_finaliser():
    from crossgrad.codecs import fmix32

    def reference(z):
        mask = (1 << 32) - 1
        z &= mask
        z = ((z ^ (z >> 16)) * 0x85EBCA6B) & mask
        z = ((z ^ (z >> 13)) * 0xC2B2AE35) & mask
        return z ^ (z >> 16)

    values = [0, 1, 2, 12345, -5, 2**31 - 1, -(2**31)]
    got = fmix32(torch.tensor(values, dtype=torch.int32))
    assert [int(v) & ((1 << 32) - 1) for v in got] == [reference(v) for v in values]


@pytest.mark.parametrize("cls", [TopK, RandomK])
def test_sparse_roundtrip_equals_decode_of_encode_and_bytes_are_counted(cls):
    layout = layout_of(30, 11, 2)
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(4, layout.size, dtype=dtype)
        codec = cls(layout, ratio=0.1)
        payload = codec.encode(rows)
        assert torch.equal(codec.roundtrip(rows.clone()), codec.decode(payload, dtype))
        per_row = sum(t[0].numel() * t.element_size() for t in payload)
        assert per_row == codec.message_bytes(dtype) == (3 + 1 + 1) * (4 + rows.element_size())
        in_place = rows.clone()
        _, decoded = codec.encode_roundtrip(in_place, out=in_place)  # out may be the rows
        assert decoded is in_place and torch.equal(decoded, codec.decode(payload, dtype))


@pytest.mark.parametrize("name", ["top-k", "random-k"])
def test_error_feedback_with_sparse_codecs(name):
    layout = layout_of(12, 5)
    ef = ErrorFeedback(make_codec(name, layout, ratio=0.25))
    g = torch.randn(3, layout.size, dtype=torch.float64)
    total = torch.zeros_like(g)
    for _ in range(30):
        payload, c = ef.encode(g)
        assert torch.equal(ef.codec.decode(payload, torch.float64), c)
        total += c
    torch.testing.assert_close(total + ef.memory, 30 * g)
    # the memory keeps what was not sent; a sparse message is exactly the kept entries of e + g
    assert torch.all((c != 0).sum(1) <= 3 + 1)


def test_error_feedback_draws_random_k_anew_each_batch_and_saves_its_count():
    layout = layout_of(16)
    ef = ErrorFeedback(make_codec("random-k", layout, ratio=0.25))
    ef.init((2, 16), torch.float64, "cpu")
    g = torch.randn(2, 16, dtype=torch.float64)
    first, _ = ef.encode(g)
    state = ef.state_dict()
    assert state["count"] == 1
    second, _ = ef.encode(g)
    assert not torch.equal(first[0], second[0])
    other = ErrorFeedback(make_codec("random-k", layout, ratio=0.25))
    other.init((2, 16), torch.float64, "cpu")
    other.load_state_dict(state)
    assert torch.equal(other.encode(g)[0][0], second[0])
    assert "count" not in ErrorFeedback(ScaledSign(layout)).state_dict()  # deterministic codecs save no count


def test_sparse_codec_options_are_checked():
    layout = layout_of(4)
    assert make_codec("top-k", layout).ratio == 0.01
    with pytest.raises(cg.ConfigError, match=r"top-k codec's ratio .* must be in \(0, 1\], not 0"):
        make_codec("top-k", layout, ratio=0)
    with pytest.raises(cg.ConfigError, match="the sign codec keeps every entry: it takes no ratio"):
        make_codec("sign", layout, ratio=0.1)


@pytest.mark.parametrize("codec", ["top-k", "random-k"])
def test_ngc_compresses_cross_gradients_with_sparse_codecs(codec):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
                for _ in range(4)] for _ in range(2)]
    sim = cg.Simulator(model, cg.Topology.ring(4), cg.make_algorithm("ngc", lr=0.1, codec=codec))
    for b in batches:
        sim.step(b)
    assert torch.isfinite(sim.params).all()
    message = 4 * (4 + 8)  # 1 % of each of the 4 tensors: one int32 position and one float64 value each
    assert torch.all(sim.stats["bytes_sent"][:, 1] == 2 * 2 * message)  # 2 steps x 2 neighbours
