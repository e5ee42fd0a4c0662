import math

import pytest
import torch

import crossgrad as cg
from crossgrad.codecs import ErrorFeedback, Identity, ScaledSign, make_codec, pack_bits, unpack_bits
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
    with pytest.raises(cg.ConfigError, match="unknown codec 'topk'; available: identity, sign"):
        make_codec("topk", layout)


def test_identity_roundtrip():
    rows = torch.randn(3, 7)
    assert torch.equal(Identity().decode(Identity().encode(rows), rows.dtype), rows)


def test_roundtrip_equals_decode_of_encode():
    layout = layout_of(5, 11, 3, 64, 1)
    comp = ScaledSign(layout)
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(7, layout.size, dtype=dtype)
        rows[:, ::5] = 0.0
        assert torch.equal(comp.roundtrip(rows), comp.decode(comp.encode(rows), dtype))
