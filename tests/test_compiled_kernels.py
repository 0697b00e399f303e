"""The torch.compile'd kernels (LayerNorm for widths not a multiple of 8, the FAVOR+ feature map)
against the eager code they replace: same values and gradients. They switch on for CUDA tensors;
here the switch is forced on, so the CPU backend (C++ through gcc) compiles the same functions."""

import torch
import torch.nn.functional as F

from haodiff_model.nets import layers, performer
from haodiff_model.nets.layers import LayerNorm
from haodiff_model.nets.performer import FastAttention


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _force_compiled(monkeypatch) -> list[torch.Size]:
    """Take the compiled branch for every tensor; returns the shapes it was asked about."""
    calls: list[torch.Size] = []

    def enabled(x: torch.Tensor) -> bool:
        calls.append(x.shape)
        return True

    monkeypatch.setattr(layers, "compiled_kernels_enabled", enabled)
    monkeypatch.setattr(performer, "compiled_kernels_enabled", enabled)
    return calls


def _value_and_grads(fn, inputs, upstream):
    out = fn()
    return out.detach(), torch.autograd.grad(out, inputs, upstream)


def test_compiled_layer_norm_matches_eager_values_and_gradients(monkeypatch):
    norm = LayerNorm(150)  # 150 % 8 != 0: the width the compiled kernel exists for
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(150, generator=_gen(1)))
        norm.bias.copy_(0.2 * torch.randn(150, generator=_gen(2)))
    x = (3 * torch.randn(4, 37, 150, generator=_gen(3)) + 1).requires_grad_(True)
    upstream = torch.randn(4, 37, 150, generator=_gen(4))
    inputs = (x, norm.weight, norm.bias)
    eager, eager_grads = _value_and_grads(lambda: F.layer_norm(x, (150,), norm.weight, norm.bias, norm.eps),
                                          inputs, upstream)
    calls = _force_compiled(monkeypatch)
    ours, grads = _value_and_grads(lambda: norm(x), inputs, upstream)
    assert calls  # the compiled branch was taken
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    calls.clear()
    torch.testing.assert_close(LayerNorm(16)(x[..., :16]), F.layer_norm(x[..., :16], (16,)))
    assert not calls  # widths divisible by 8 keep PyTorch's own kernel


def test_compiled_favor_feature_map_matches_eager_values_and_gradients(monkeypatch):
    fa = FastAttention(16, 20)  # 20 features, padded to 24 by repeating row 0
    fa.redraw_projection_matrix(_gen(5))
    qk = (2 * torch.randn(2, 2, 3, 50, 16, generator=_gen(6))).requires_grad_(True)
    v = torch.randn(2, 3, 50, 16, generator=_gen(7)).requires_grad_(True)
    upstream = torch.randn(2, 3, 50, 16, generator=_gen(8))
    eager, eager_grads = _value_and_grads(lambda: fa(qk, v), (qk, v), upstream)  # CPU: the in-place eager map
    calls = _force_compiled(monkeypatch)
    ours, grads = _value_and_grads(lambda: fa(qk, v), (qk, v), upstream)
    assert calls
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
