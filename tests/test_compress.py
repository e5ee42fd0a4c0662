import math

import torch

from crossgrad.compress import Identity, ScaledSign, error_feedback, pack_bits, unpack_bits
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
    comp = ScaledSign(layout)
    memory = torch.zeros(2, layout.size, dtype=torch.float64)
    g = torch.randn(2, layout.size, dtype=torch.float64)
    total_sent = torch.zeros_like(g)
    for _ in range(50):
        _, c = error_feedback(comp, g, memory)
        total_sent += c
    # sent + memory == everything fed in, exactly the error-feedback invariant
    torch.testing.assert_close(total_sent + memory, 50 * g)
    assert (memory.abs().max() < g.abs().max() * 10)


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
