"""Folding an inference BatchNorm into the layer before it (fold_batch_norm, fastnorm.torch.fold_conv_bn)."""

from __future__ import annotations

import numpy as np
import pytest

import fastnorm

torch = pytest.importorskip("torch")
fnt = pytest.importorskip("fastnorm.torch")

pytestmark = pytest.mark.torch


def _bn(channels, cls=torch.nn.BatchNorm2d, seed=0, affine=True):
    gen = torch.Generator().manual_seed(seed)
    bn = cls(channels, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.2)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=gen))
            bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn.eval()


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_batch_norm_matches_torch_fusion(conv_bias, affine):
    """The folded weights equal torch.nn.utils.fusion's (float64) to rounding."""
    conv = torch.nn.Conv2d(3, 8, 3, bias=conv_bias).double().eval()
    bn = _bn(8, affine=affine).double()
    want = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    weight, bias = fastnorm.fold_batch_norm(
        conv.weight.detach().numpy(),
        None if conv.bias is None else conv.bias.detach().numpy(),
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        None if bn.weight is None else bn.weight.detach().numpy(),
        None if bn.bias is None else bn.bias.detach().numpy(),
        bn.eps,
    )
    assert weight.dtype == np.float64 and bias.shape == (8,)
    np.testing.assert_allclose(weight, want.weight.detach().numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(bias, want.bias.detach().numpy(), rtol=1e-14, atol=1e-15)


def test_fold_batch_norm_against_the_formula_float32_and_axis():
    """float32 in, float32 out (rounded once from float64); channels_axis picks the output channels."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 5, 2)).astype(np.float32)
    mean, var = rng.standard_normal(5), rng.uniform(0.1, 2, 5)
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    folded, b = fastnorm.fold_batch_norm(w, None, mean, var, gamma, beta, 1e-5, channels_axis=1)
    scale = gamma / np.sqrt(var + 1e-5)
    assert folded.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_array_equal(folded, (w.astype(np.float64) * scale[None, :, None]).astype(np.float32))
    np.testing.assert_array_equal(b, (beta - mean * scale).astype(np.float32))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"running_mean": np.zeros(3)}, ValueError, r"running_mean.shape=\(3,\) must be \(4,\)"),
        ({"running_var": np.array([1.0, -2.0, 1.0, 1.0])}, ValueError, "channel 1 has"),
        ({"running_var": np.array([1.0, 1.0, np.nan, 1.0])}, ValueError, "channel 2 has"),
        ({"eps": -1.0}, ValueError, "eps=-1.0 must be finite"),
        ({"channels_axis": 3}, ValueError, "channels_axis=3 is out of range"),
        ({"conv_weight": np.array(["a"])}, TypeError, "conv_weight.dtype"),
    ],
)
def test_fold_batch_norm_bad_input(kwargs, error, message):
    args = {
        "conv_weight": np.ones((4, 2, 3)),
        "conv_bias": None,
        "running_mean": np.zeros(4),
        "running_var": np.ones(4),
        **kwargs,
    }
    with pytest.raises(error, match=message):
        fastnorm.fold_batch_norm(**args)


class _Block(torch.nn.Module):
    """A ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = _bn(channels, seed=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = _bn(channels, seed=2)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        _bn(8, seed=3),
        torch.nn.ReLU(),
        _Block(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
        _bn(10, torch.nn.BatchNorm1d, seed=4),
    ).eval()


@pytest.mark.parametrize("convert", [False, True], ids=["torch-bn", "fastnorm-bn"])
def test_fold_conv_bn_folds_every_pair(convert):
    model = _model()
    if convert:
        fnt.convert(model)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        folded = fnt.fold_conv_bn(model)
        got = folded(x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert (
        sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 4
    )  # unchanged
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the original still runs as before
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    torch.testing.assert_close(folded.get_submodule("0").weight, fused.weight, rtol=1e-6, atol=1e-7)


def test_fold_conv_bn_leaves_what_does_not_fold():
    bn = fnt.BatchNorm2d(4, activation="relu").eval()
    shared = torch.nn.Conv2d(2, 4, 1)

    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fused = shared, _bn(4), bn

        def forward(self, x):
            u = self.conv(x)
            return self.bn(u) + u + self.fused(self.conv(x))  # conv output used twice; bn with relu

    folded = fnt.fold_conv_bn(Branching().eval())
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == 2
    with pytest.raises(ValueError, match="eval-mode"):
        fnt.fold_conv_bn(_model().train())
