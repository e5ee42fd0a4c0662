"""Tests for crossgrad.models (registry, norms, architectures)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from crossgrad.models import (
    NORM_KINDS,
    EvoNormS0,
    count_parameters,
    default_groups,
    describe_models,
    list_models,
    make_model,
    make_norm,
    register_model,
)

CONV_MODELS = ("cnn5", "lenet5", "vgg11", "resnet20", "mobilenetv2")
SMALL_MODELS = ("cnn5", "lenet5", "mlp")  # the ones that also run on 1x28x28 and 1x8x8

CASES = (
    [(m, (1, 28, 28), n) for m in ("cnn5", "lenet5") for n in NORM_KINDS]
    + [("mlp", (1, 28, 28), "none")]
    + [(m, (3, 32, 32), n) for m in CONV_MODELS for n in NORM_KINDS]
    + [(m, (1, 8, 8), n) for m in ("cnn5", "lenet5") for n in ("evonorm", "batch")]
    + [("mlp", (1, 8, 8), "none"), ("mlp", (3, 32, 32), "none")]
)


def _run_fwd_bwd(model, shape, dtype=torch.float32, batch=3, classes=7):
    x = torch.randn(batch, *shape, dtype=dtype)
    y = torch.arange(batch) % classes
    out = model(x)
    assert out.shape == (batch, classes)
    assert out.dtype == dtype
    F.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    return out


def test_registry_lists_all_models():
    assert set(list_models()) >= {"cnn5", "lenet5", "vgg11", "resnet20", "mobilenetv2", "mlp"}
    assert list_models() == sorted(list_models())


def _case_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("name,shape,norm", CASES, ids=_case_id)
def test_forward_backward(name, shape, norm):
    torch.manual_seed(0)
    model = make_model(name, input_shape=shape, num_classes=7, norm=norm)
    model.train()
    _run_fwd_bwd(model, shape)
    assert model.input_shape == shape and model.num_classes == 7


@pytest.mark.parametrize("name", ["cnn5", "lenet5", "mlp", "resnet20", "mobilenetv2", "vgg11"])
def test_float64(name):
    torch.manual_seed(0)
    shape = (1, 28, 28) if name in SMALL_MODELS else (3, 32, 32)
    kw = {"width": 0.25} if name in ("vgg11", "mobilenetv2") else {}
    model = make_model(name, shape, num_classes=7, **kw).double()
    _run_fwd_bwd(model, shape, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(set(CONV_MODELS) | {"mlp"}))
def test_same_seed_same_parameters(name):
    kw = {"width": 0.25} if name in ("vgg11", "mobilenetv2") else {}
    torch.manual_seed(123)
    a = make_model(name, **kw)
    torch.manual_seed(123)
    b = make_model(name, **kw)
    torch.manual_seed(124)
    c = make_model(name, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_model_and_norm():
    with pytest.raises(ValueError, match="available models:.*cnn5"):
        make_model("resnet1000")
    with pytest.raises(ValueError, match="available norms:.*evonorm"):
        make_model("cnn5", norm="layer")
    with pytest.raises(ValueError, match="available norms"):
        make_norm("instance", 8)


@pytest.mark.parametrize(
    "name,shape",
    [("vgg11", (1, 8, 8)), ("vgg11", (3, 16, 16)), ("cnn5", (1, 4, 4)), ("cnn5", (1, 8, 7)),
     ("mobilenetv2", (3, 4, 4)), ("resnet20", (3, 2, 2)), ("lenet5", (1, 3, 3))],
)
def test_too_small_inputs(name, shape):
    with pytest.raises(ValueError, match="at least|larger inputs"):
        make_model(name, shape)


def test_too_small_message_suggests_models():
    with pytest.raises(ValueError, match="cnn5") as info:
        make_model("vgg11", (1, 8, 8))
    assert "8x8" in str(info.value) and "vgg11" in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_model("cnn5", input_shape=(28, 28))
    with pytest.raises(ValueError):
        make_model("cnn5", num_classes=0)
    with pytest.raises(ValueError):
        make_model("resnet20", shortcut="C")
    with pytest.raises(ValueError):
        register_model("cnn5")(lambda *a, **k: None)


def test_default_groups():
    assert default_groups(64) == 32
    assert default_groups(16) == 16
    assert default_groups(6) == 6
    assert default_groups(144) == 24
    assert default_groups(7) == 7
    assert default_groups(37) == 1
    with pytest.raises(ValueError):
        EvoNormS0(10, groups=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_evonorm_matches_formula(dtype, groups):
    torch.manual_seed(0)
    n, c, h, w = 2, 4, 3, 5
    layer = EvoNormS0(c, groups=groups).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(c))
        layer.bias.copy_(torch.randn(c))
        layer.v.copy_(torch.randn(c))
    x = torch.randn(n, c, h, w, dtype=dtype) * 3 + 1
    y = layer(x)
    # hand-written reference, loop over samples and groups
    ref = torch.empty_like(x)
    cg = c // groups
    for i in range(n):
        for g in range(groups):
            chunk = x[i, g * cg:(g + 1) * cg]
            mean = chunk.sum() / chunk.numel()
            var = ((chunk - mean) ** 2).sum() / chunk.numel()
            std = (var + 1e-5).sqrt()
            for k in range(g * cg, (g + 1) * cg):
                xk = x[i, k]
                ref[i, k] = xk * torch.sigmoid(layer.v[k] * xk) / std * layer.weight[k] + layer.bias[k]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, ref.detach(), atol=tol, rtol=tol)
    # without the gate: plain group normalization around zero (no mean subtraction)
    plain = EvoNormS0(c, groups=groups, apply_act=False).to(dtype)
    assert plain.v is None
    std = x.reshape(n, groups, -1).var(-1, correction=0).add(1e-5).sqrt()
    expected = x / std.repeat_interleave(cg, 1)[:, :, None, None]
    torch.testing.assert_close(plain(x), expected, atol=tol, rtol=tol)


def test_evonorm_has_no_buffers_and_is_stable():
    layer = EvoNormS0(8)
    assert list(layer.buffers()) == []
    x = torch.full((2, 8, 4, 4), 1e3, dtype=torch.float64)  # zero variance
    assert torch.isfinite(layer(x)).all()
    m = make_model("cnn5", norm="evonorm")
    assert list(m.buffers()) == []


def test_make_norm_kinds():
    assert isinstance(make_norm("evonorm", 32), EvoNormS0)
    assert isinstance(make_norm("group", 32), torch.nn.GroupNorm)
    assert make_norm("group", 48).num_groups == 24
    assert isinstance(make_norm("batch", 32), torch.nn.BatchNorm2d)
    assert isinstance(make_norm("none", 32), torch.nn.Identity)


@pytest.mark.parametrize("name", sorted(set(CONV_MODELS) | {"mlp"}))
def test_functional_call_matches_module(name):
    torch.manual_seed(0)
    kw = {"width": 0.25} if name in ("vgg11", "mobilenetv2") else {}
    model = make_model(name, num_classes=5, **kw)
    x = torch.randn(2, *model.input_shape)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    # different parameters: functional_call must use them, not the module's own
    torch.manual_seed(1)
    other = make_model(name, num_classes=5, **kw)
    other_params = dict(other.named_parameters())
    torch.testing.assert_close(functional_call(model, other_params, (x,)), other(x))


@pytest.mark.parametrize("name", ["cnn5", "resnet20", "lenet5"])
def test_vmap_over_stacked_agents(name):
    torch.manual_seed(0)
    models = [make_model(name, num_classes=4) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(3, 2, *models[0].input_shape)

    def f(p, b, xi):
        return functional_call(models[0], (p, b), (xi,))

    out = vmap(f)(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]))


def test_options_change_parameter_counts():
    assert count_parameters(make_model("resnet20", shortcut="B")) > count_parameters(make_model("resnet20"))
    assert count_parameters(make_model("vgg11", width=0.5)) < count_parameters(make_model("vgg11"))
    mbv2 = count_parameters(make_model("mobilenetv2"))
    assert count_parameters(make_model("mobilenetv2", width=0.5)) < mbv2
    assert count_parameters(make_model("mlp", hidden=(10,))) == 784 * 10 + 10 + 10 * 10 + 10
    assert 260_000 < count_parameters(make_model("resnet20")) < 280_000


def test_describe_models():
    table = describe_models((3, 32, 32), 10)
    for name in list_models():
        assert name in table
    assert "evonorm" in table
    small = describe_models((1, 8, 8), 10, norms=("evonorm", "batch"))
    assert "input too small" in small
