"""fastnorm.torch: autograd functions and nn modules against torch's own, both memory formats."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
ft = pytest.importorskip("fastnorm.torch")

pytestmark = pytest.mark.torch

#: Tolerances of a value of magnitude ~1 (the inputs are standard normal).
TOL = {torch.float32: dict(rtol=3e-5, atol=3e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}

ACTIVATIONS = {
    None: lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


def _close(got, want, dtype, what):
    assert got is not None and want is not None, what
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


#: name -> (shape, fastnorm call, torch call, parameter shape)
FUNCTIONS = {
    "batch_norm": (
        (4, 6, 5, 3),
        lambda x, w, b, r, act: ft.batch_norm(x, None, None, w, b, True, residual=r, **act),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        (6,),
    ),
    "instance_norm": (
        (3, 6, 7, 4),
        lambda x, w, b, r, act: ft.instance_norm(x, weight=w, bias=b, residual=r, **act),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
        (6,),
    ),
    "group_norm": (
        (3, 6, 5, 4),
        lambda x, w, b, r, act: ft.group_norm(x, 3, w, b, residual=r, **act),
        lambda x, w, b: F.group_norm(x, 3, w, b),
        (6,),
    ),
    "layer_norm": (
        (3, 6, 5, 4),
        lambda x, w, b, r, act: ft.layer_norm(x, (5, 4), w, b, residual=r, **act),
        lambda x, w, b: F.layer_norm(x, (5, 4), w, b),
        (5, 4),
    ),
    "rms_norm": (
        (3, 6, 5, 16),
        lambda x, w, b, r, act: ft.rms_norm(x, 16, w, residual=r, **act),
        lambda x, w, b: F.rms_norm(x, (16,), w),
        (16,),
    ),
}


def _inputs(name, dtype, channels_last, seed=0):
    shape, _, _, pshape = FUNCTIONS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=gen) * 2 + 0.5
    r = torch.randn(shape, dtype=dtype, generator=gen)
    if channels_last:
        x, r = (
            x.contiguous(memory_format=torch.channels_last),
            r.contiguous(memory_format=torch.channels_last),
        )
    w = 1 + 0.3 * torch.randn(pshape, dtype=dtype, generator=gen)
    b = None if name == "rms_norm" else torch.randn(pshape, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    return x, w, b, r, leaves


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_function_matches_torch_forward_and_gradients(name, dtype, channels_last, activation):
    """y and the gradients of x, weight, bias and residual equal torch's composite."""
    _, ours, theirs, _ = FUNCTIONS[name]
    x, w, b, r, leaves = _inputs(name, dtype, channels_last)
    act = (
        {"activation": activation}
        if activation != "leaky_relu"
        else {"activation": activation, "negative_slope": 0.2}
    )
    act = {} if activation is None else act
    y = ours(x, w, b, r, act)
    y_torch = ACTIVATIONS[activation](theirs(x, w, b) + r)
    _close(y, y_torch, dtype, "y")
    if channels_last and name in ("batch_norm", "instance_norm", "group_norm"):
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    elif not channels_last:
        assert y.is_contiguous()
    dy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(y, leaves, dy)
    grads_torch = torch.autograd.grad(y_torch, leaves, dy)
    for got, want, what in zip(
        grads, grads_torch, ["dx", "dweight", "dbias", "dresidual"][: len(leaves)], strict=True
    ):
        if what == "dbias" and name == "rms_norm":
            what = "dresidual"
        _close(got, want, dtype, what)


#: name -> (x shape, parameter shape, call with a GELU / SiLU epilogue): small, for finite differences.
GRADCHECK = {
    "batch_norm": (
        (3, 2, 3),
        (2,),
        lambda x, w, b, r: ft.batch_norm(x, None, None, w, b, True, residual=r, activation="gelu"),
    ),
    "instance_norm": (
        (2, 2, 4),
        (2,),
        lambda x, w, b, r: ft.instance_norm(x, None, None, w, b, residual=r, activation="gelu"),
    ),
    "group_norm": (
        (2, 4, 3),
        (4,),
        lambda x, w, b, r: ft.group_norm(x, 2, w, b, residual=r, activation="silu"),
    ),
    "layer_norm": (
        (3, 2, 4),
        (4,),
        lambda x, w, b, r: ft.layer_norm(x, 4, w, b, residual=r, activation="gelu"),
    ),
    "rms_norm": ((3, 2, 4), (4,), lambda x, w, b, r: ft.rms_norm(x, 4, w, residual=r, activation="silu")),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    """Gradients of x, weight, bias and residual against finite differences, through an activation."""
    shape, pshape, call = GRADCHECK[name]
    gen = torch.Generator().manual_seed(11)
    x, r = (torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    w, b = (torch.randn(pshape, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    if name == "rms_norm":
        assert torch.autograd.gradcheck(lambda x, w, r: call(x, w, None, r), (x, w, r))
    else:
        assert torch.autograd.gradcheck(call, (x, w, b, r))


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_fixed_statistics_backward_gradcheck(activation):
    """BatchNorm in eval mode and InstanceNorm with running statistics: the affine map's gradients."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    r = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()
    rm, rv = (
        torch.randn(4, dtype=torch.float64, generator=gen),
        torch.rand(4, dtype=torch.float64, generator=gen) + 0.5,
    )

    def bn(x, w, b, r):
        return ft.batch_norm(x, rm, rv, w, b, False, residual=r, activation=activation)

    def inorm(x, w, b, r):
        return ft.instance_norm(x, rm, rv, w, b, use_input_stats=False, residual=r, activation=activation)

    for call in (bn, inorm):
        assert torch.autograd.gradcheck(call, (x, w, b, r))
    want = ACTIVATIONS[activation](F.batch_norm(x, rm, rv, w, b, False) + r)
    _close(bn(x, w, b, r), want, torch.float64, "eval y")


def _module_pairs():
    """(torch module, fastnorm module class, input shape); same constructor arguments."""
    return [
        (torch.nn.BatchNorm1d(6), ft.BatchNorm1d, (8, 6)),
        (torch.nn.BatchNorm1d(6, momentum=None), ft.BatchNorm1d, (4, 6, 5)),
        (torch.nn.BatchNorm2d(6), ft.BatchNorm2d, (4, 6, 5, 3)),
        (torch.nn.BatchNorm2d(6, affine=False, track_running_stats=False), ft.BatchNorm2d, (4, 6, 5, 3)),
        (torch.nn.BatchNorm3d(4, momentum=0.3), ft.BatchNorm3d, (2, 4, 3, 3, 2)),
        (torch.nn.InstanceNorm1d(6), ft.InstanceNorm1d, (3, 6, 9)),
        (torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True), ft.InstanceNorm2d, (3, 6, 5, 4)),
        (torch.nn.InstanceNorm3d(4, affine=True), ft.InstanceNorm3d, (2, 4, 3, 3, 2)),
        (torch.nn.GroupNorm(3, 6), ft.GroupNorm, (3, 6, 5, 4)),
        (torch.nn.LayerNorm((5, 4)), ft.LayerNorm, (3, 6, 5, 4)),
        (torch.nn.LayerNorm(8, bias=False), ft.LayerNorm, (3, 7, 8)),
        (torch.nn.RMSNorm(8), ft.RMSNorm, (3, 7, 8)),
        (torch.nn.RMSNorm(8, eps=1e-6, elementwise_affine=False), ft.RMSNorm, (3, 7, 8)),
    ]


@pytest.mark.parametrize("index", range(len(_module_pairs())))
def test_module_trains_like_torch(index):
    """Three training steps and an eval step: outputs, gradients, running statistics, state_dict."""
    theirs, cls, shape = _module_pairs()[index]
    theirs = theirs.double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = copy.deepcopy(theirs)
    ours.__class__ = cls
    ours._set_epilogue(None, 0.01)
    state = theirs.state_dict()
    fresh = _fresh(theirs, cls)
    fresh.load_state_dict(state)  # a torch checkpoint loads into the fastnorm module
    assert list(fresh.state_dict()) == list(state)
    gen = torch.Generator().manual_seed(index)
    for step in range(4):
        if step == 3:
            theirs.eval(), ours.eval()
        x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1).requires_grad_()
        y_torch, y = theirs(x), ours(x)
        _close(y, y_torch, torch.float64, f"step {step} y")
        dy = torch.randn(shape, dtype=torch.float64, generator=gen)
        wanted = [x, *theirs.parameters()]
        grads_torch = torch.autograd.grad(y_torch, wanted, dy)
        grads = torch.autograd.grad(y, [x, *ours.parameters()], dy)
        for got, want in zip(grads, grads_torch, strict=True):
            _close(got, want, torch.float64, f"step {step} gradients")
        for (key, got), (_, want) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
            if got.is_floating_point():
                _close(got, want, torch.float64, f"step {step} {key}")
            else:
                assert torch.equal(got, want), (key, got, want)
    back = copy.deepcopy(theirs)
    back.load_state_dict(ours.state_dict())  # and back into torch's


def _fresh(theirs, cls):
    """A new fastnorm module built with ``theirs``'s constructor arguments."""
    if isinstance(theirs, torch.nn.GroupNorm):
        return cls(theirs.num_groups, theirs.num_channels, theirs.eps, theirs.affine, dtype=torch.float64)
    if isinstance(theirs, torch.nn.LayerNorm):
        bias = theirs.bias is not None
        return cls(theirs.normalized_shape, theirs.eps, theirs.elementwise_affine, bias, dtype=torch.float64)
    if isinstance(theirs, torch.nn.RMSNorm):
        return cls(theirs.normalized_shape, theirs.eps, theirs.elementwise_affine, dtype=torch.float64)
    return cls(
        theirs.num_features,
        theirs.eps,
        theirs.momentum,
        theirs.affine,
        theirs.track_running_stats,
        dtype=torch.float64,
    )


def test_module_activation_and_residual():
    torch.manual_seed(0)
    ours = ft.BatchNorm2d(6, activation="relu")
    theirs = torch.nn.BatchNorm2d(6)
    x, identity = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x, identity), F.relu(theirs(x) + identity), **TOL[torch.float32])
    assert "activation='relu'" in repr(ours)
    with pytest.raises(ValueError, match="activation"):
        ft.GroupNorm(2, 6, activation="swish")


def _small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.GroupNorm(4, 8),
        torch.nn.SiLU(),
        torch.nn.Flatten(2),
        torch.nn.LayerNorm(36),
        torch.nn.Linear(36, 16),
        torch.nn.RMSNorm(16),
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_convert_keeps_the_parameters_and_the_outputs(channels_last):
    torch.manual_seed(1)
    model = _small_cnn()
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ft.convert(model) is model
    assert [type(m).__module__ for m in model if "Norm" in type(m).__name__] == ["fastnorm.torch"] * 4
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    x = torch.randn(4, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # training steps with the optimizer built before the conversion
        for net in (model, reference):
            net.zero_grad()
            net(x).square().mean().backward()
        optimizer.step()
        torch.optim.SGD(reference.parameters(), lr=0.1).step()
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-5, atol=1e-6)


def test_convert_refuses_tensors_off_the_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).to("meta")
    with pytest.raises(ValueError, match="1.weight is on meta"):
        ft.convert(model)
    assert type(model[1]) is torch.nn.BatchNorm1d  # nothing converted


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="CPU tensors only"):
        ft.layer_norm(torch.zeros(2, 4, device="meta"), 4)
    with pytest.raises(TypeError, match="input.dtype=torch.int64"):
        ft.layer_norm(torch.zeros(2, 4, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ft.layer_norm(np.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        ft.batch_norm(torch.zeros(2, 4), None, None)


def test_bfloat16_matches_torch():
    """bfloat16 data, float32 parameters: y and dx within torch's own bfloat16 tolerance."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 32, 6, 6, generator=gen) * 3 + 1).bfloat16().requires_grad_()
    w = torch.rand(32, generator=gen).add(0.5).requires_grad_()
    b = torch.randn(32, generator=gen).requires_grad_()
    y = ft.group_norm(x, 8, w, b)
    assert y.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    want = F.group_norm(x32, 8, w, b)
    torch.testing.assert_close(y.float(), want, rtol=1.6e-2, atol=1e-2)
    dy = torch.randn(y.shape, generator=gen).bfloat16()
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx_want, dw_want = torch.autograd.grad(want, (x32, w), dy.float())
    torch.testing.assert_close(dx.float(), dx_want, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(dw, dw_want, rtol=1e-3, atol=1e-3)


def _route_models():
    """name -> (module, input shape, memory format): every eager route of fastnorm.torch."""
    last = torch.channels_last
    return {
        "batch_norm train": (ft.BatchNorm2d(6, activation="relu"), (4, 6, 5, 3), last),
        "batch_norm momentum=None": (ft.BatchNorm2d(6, momentum=None), (4, 6, 5, 3), None),
        "batch_norm eval": (ft.BatchNorm2d(6).eval(), (4, 6, 5, 3), last),
        "instance_norm running": (
            ft.InstanceNorm2d(6, affine=True, track_running_stats=True),
            (3, 6, 5, 4),
            None,
        ),
        "group_norm": (ft.GroupNorm(3, 6, activation="silu"), (3, 6, 5, 4), last),
        "layer_norm": (ft.LayerNorm(8), (5, 8), None),
        "rms_norm": (ft.RMSNorm(8), (5, 8), None),
    }


@pytest.mark.parametrize("name", list(_route_models()))
def test_eager_function_and_custom_op_routes_give_the_same_bits(name, monkeypatch):
    """Eager calls run the torch.autograd.Function twin; under torch.compile the calls are the
    custom ops and the running statistics update by torch operations.  Forced through the ops
    route eagerly (is_compiling patched to True), the outputs, every gradient and the running
    statistics are bitwise those of the Function route."""
    torch.manual_seed(1)
    module, shape, memory_format = _route_models()[name]
    x = torch.randn(shape, dtype=torch.float64).to(torch.float32)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    dy = torch.randn(shape)
    results = []
    for ops in (False, True):
        model = copy.deepcopy(module)
        leaf = x.clone().requires_grad_()
        with monkeypatch.context() as patch:
            if ops:
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
            for _ in range(2):  # twice: the running statistics are read back
                y = model(leaf)
                y.backward(dy)
        grads = [leaf.grad] + [p.grad for p in model.parameters()]
        results.append((y.detach(), grads, [b.clone() for b in model.buffers()]))
    (y, grads, buffers), (y_op, grads_op, buffers_op) = results
    assert torch.equal(y, y_op), name
    for got, want in zip(grads, grads_op, strict=True):
        assert torch.equal(got, want), name
    assert len(buffers) == len(buffers_op)
    for got, want in zip(buffers, buffers_op, strict=True):
        assert torch.equal(got, want), name


#: name -> (call(x, residual), input shape, dtype, memory format of x, residual given,
#: whether the call is prepared): the eager training calls, prepared and general.
PREPARED_CALLS = {
    "batch_norm relu residual": (
        lambda x, r: ft.BatchNorm2d(6, activation="relu")(x, r),
        (4, 6, 5, 3),
        torch.float32,
        torch.channels_last,
        True,
        True,
    ),
    "batch_norm residual": (
        lambda x, r: ft.BatchNorm2d(6).double()(x, r),
        (4, 6, 5, 3),
        torch.float64,
        None,
        True,
        True,
    ),
    "batch_norm no affine": (
        lambda x, r: ft.BatchNorm3d(6, affine=False)(x),
        (2, 6, 3, 4, 2),
        torch.float32,
        torch.channels_last_3d,
        False,
        True,
    ),
    "instance_norm": (
        lambda x, r: ft.InstanceNorm1d(6, affine=True, track_running_stats=True)(x),
        (3, 6, 7),
        torch.float32,
        None,
        False,
        True,
    ),
    "group_norm silu": (
        lambda x, r: ft.GroupNorm(3, 6, activation="silu")(x),
        (3, 6, 5, 4),
        torch.float32,
        torch.channels_last,
        False,
        True,
    ),
    "layer_norm 2-D shape": (
        lambda x, r: ft.LayerNorm((4, 5)).double()(x),
        (3, 4, 5),
        torch.float64,
        None,
        False,
        True,
    ),
    "rms_norm residual": (
        lambda x, r: ft.rms_norm(x, 8, torch.linspace(0.5, 2, 8, requires_grad=True), residual=r),
        (5, 8),
        torch.float32,
        None,
        True,
        True,
    ),
    "layer_norm channels-last input": (
        lambda x, r: ft.LayerNorm((5, 3))(x),
        (4, 6, 5, 3),
        torch.float32,
        torch.channels_last,
        False,
        False,
    ),
    "batch_norm bfloat16": (
        lambda x, r: ft.BatchNorm2d(6)(x),
        (4, 6, 5, 3),
        torch.bfloat16,
        None,
        False,
        False,
    ),
}


@pytest.mark.parametrize("name", list(PREPARED_CALLS))
@pytest.mark.parametrize("dy_format", ["like x", "c order"])
def test_prepared_and_general_routes_give_the_same_bits(name, dy_format, monkeypatch):
    """An eager training call whose signature was seen before runs its prepared pass (checks and
    plan once per geometry); switched off, the general route.  Outputs, every gradient (through
    a residual too, and with dy in another memory order than x) and the running statistics are
    bitwise those of the general route; the calls that need a copy or a 16-bit view are not
    prepared."""
    pytest.importorskip("ml_dtypes")
    call, shape, dtype, memory_format, with_residual, prepared = PREPARED_CALLS[name]
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    residual = torch.randn(shape, generator=gen, dtype=dtype).contiguous(
        memory_format=memory_format or torch.contiguous_format
    )
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if dy_format == "like x":
        dy = dy.contiguous(memory_format=memory_format or torch.contiguous_format)
    results = []
    for use_prepared in (True, False):
        monkeypatch.setattr(ft, "_USE_PREPARED", use_prepared)
        ft._PREPARED.clear()
        torch.manual_seed(0)  # the modules' parameters
        leaf = x.clone().requires_grad_()
        leaf_residual = residual.clone().requires_grad_() if with_residual else None
        runs = []
        for _ in range(2):  # twice: a prepared pass is looked up the second time
            module_call = call(leaf, leaf_residual)
            y = module_call
            grads = torch.autograd.grad(y, [leaf] + ([leaf_residual] if with_residual else []), dy)
            runs.append((y.detach(), grads))
        was_prepared = any(p is not None for p in ft._PREPARED.values())
        assert was_prepared == (use_prepared and prepared), name
        results.append(runs)
    for (y, grads), (y_general, grads_general) in zip(*results, strict=True):
        assert torch.equal(y, y_general), name
        assert y.stride() == y_general.stride(), name
        for got, want in zip(grads, grads_general, strict=True):
            assert got.stride() == want.stride(), name
            assert torch.equal(got, want), name
        if prepared:  # outputs and gradients in x's memory format
            assert all(t.stride() == x.stride() for t in (y, *grads)), name


@pytest.mark.parametrize("name", ["batch_norm train", "group_norm", "layer_norm"])
def test_prepared_modules_update_parameters_and_running_statistics_as_the_general_route(name, monkeypatch):
    """Module calls, prepared and general: the parameters' gradients and the running statistics
    after three steps are bitwise the same."""
    module, shape, memory_format = _route_models()[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    results = []
    for use_prepared in (True, False):
        monkeypatch.setattr(ft, "_USE_PREPARED", use_prepared)
        model = copy.deepcopy(module)
        for _ in range(3):
            model(x).square().sum().backward()
        results.append([t.clone() for t in (*model.buffers(), *(p.grad for p in model.parameters()))])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want), name


def test_a_prepared_signature_still_checks_new_arguments(monkeypatch):
    """A call that differs from a prepared one in a tensor's shape, dtype, strides or type is
    checked again: a wrong weight raises the general route's error, after a good call on the
    same input."""
    x = torch.randn(4, 6, 5, 3)
    weight, bias = torch.ones(6), torch.zeros(6)
    ft.batch_norm(x, None, None, weight, bias, True)
    ft.batch_norm(x, None, None, weight, bias, True)
    with pytest.raises(ValueError, match=r"weight.shape=\(5,\)"):
        ft.batch_norm(x, None, None, torch.ones(5), bias, True)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ft.batch_norm(x, None, None, np.ones(6, np.float32), bias, True)
    with pytest.raises(ValueError, match="activation"):
        ft.batch_norm(x, None, None, weight, bias, True, activation="nope")
    y = ft.batch_norm(x, None, None, weight.double(), bias, True)  # 64-bit weight: general route
    torch.testing.assert_close(y, F.batch_norm(x, None, None, weight, bias, True), rtol=3e-5, atol=3e-5)


# inductor's own import of torch.jit code warns (torch 2.13), nothing of fastnorm's
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_runs_the_kernels_without_a_graph_break():
    """``torch.compile(fullgraph=True)`` (inductor): the custom ops trace; forward, backward and
    the running statistics match eager, in training and in eval mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        ft.BatchNorm2d(8, activation="relu"),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        ft.GroupNorm(4, 8, activation="silu"),
        torch.nn.Flatten(2),
        ft.LayerNorm(36),
        torch.nn.Linear(36, 4),
        ft.RMSNorm(4),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        model.train(mode == "train"), eager.train(mode == "train")
        y, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y_eager.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(
                p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=f"{mode} {name}": f"{n}: {m}"
            )
        torch.testing.assert_close(model[1].running_var, eager[1].running_var, rtol=1e-6, atol=1e-7)
        assert int(model[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_convert_resnet18_and_a_transformer_block(channels_last):
    """ResNet-18 and a pre-LN transformer block (benchmarks/models.py), converted: two training
    steps (SGD) and an eval forward as torch's layers give them."""
    from benchmarks.models import PreNormBlock, ResNet18

    torch.manual_seed(0)
    resnet = ResNet18(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        resnet, x = (
            resnet.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    cases = [
        (resnet, x, torch.randint(0, 10, (4,))),
        (PreNormBlock(width=64, heads=4, norm="rms"), torch.randn(2, 8, 64), None),
    ]
    for reference, inputs, target in cases:
        ours = ft.convert(copy.deepcopy(reference))
        assert not any(
            type(m).__module__.startswith("torch.nn") and "Norm" in type(m).__name__ for m in ours.modules()
        )
        for net in (reference, ours):
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            for _ in range(2):
                optimizer.zero_grad()
                out = net(inputs)
                loss = (
                    torch.nn.functional.cross_entropy(out, target)
                    if target is not None
                    else out.square().mean()
                )
                loss.backward()
                optimizer.step()
        reference.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(inputs), reference(inputs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_skip_bias", [False, True], ids=["", "skip_bias"])
def test_skip_norms_match_torch_through_y_and_h(kind, dtype, with_skip_bias):
    """``y, h = skip_*_norm(x, skip)``: a loss on both; gradients of x, skip, skip_bias, weight, bias."""
    gen = torch.Generator().manual_seed(2)
    x, skip = (torch.randn(3, 5, 16, dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    w = (1 + 0.3 * torch.randn(16, dtype=dtype, generator=gen)).requires_grad_()
    b = torch.randn(16, dtype=dtype, generator=gen).requires_grad_() if kind == "layer" else None
    sb = torch.randn(16, dtype=dtype, generator=gen).requires_grad_() if with_skip_bias else None
    if kind == "layer":
        y, h = ft.skip_layer_norm(x, skip, 16, w, b, skip_bias=sb)
    else:
        y, h = ft.skip_rms_norm(x, skip, 16, w, 1e-6, skip_bias=sb)
    h_torch = x + skip + (sb if sb is not None else 0)
    y_torch = F.layer_norm(h_torch, (16,), w, b) if kind == "layer" else F.rms_norm(h_torch, (16,), w, 1e-6)
    _close(h, h_torch, dtype, "h")
    _close(y, y_torch, dtype, "y")
    gy, gh = (torch.randn(3, 5, 16, dtype=dtype, generator=gen) for _ in range(2))
    leaves = [t for t in (x, skip, w, b, sb) if t is not None]
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    grads_torch = torch.autograd.grad((y_torch * gy).sum() + (h_torch * gh).sum(), leaves)
    for got, want in zip(grads, grads_torch, strict=True):
        _close(got, want, dtype, "gradients")
    only_y = torch.autograd.grad(ft.skip_layer_norm(x, skip, 16, w, None)[0].sum(), [x])[0]
    torch.testing.assert_close(
        only_y, torch.autograd.grad(F.layer_norm(x + skip, (16,), w).sum(), [x])[0], **TOL[dtype]
    )


def test_skip_layer_norm_gradcheck_and_compile():
    gen = torch.Generator().manual_seed(4)
    x, skip = (torch.randn(2, 3, 4, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    w, b, sb = (torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))

    def both(x, skip, w, b, sb):
        y, h = ft.skip_layer_norm(x, skip, 4, w, b, skip_bias=sb)
        return y * 2 + h.sin()

    assert torch.autograd.gradcheck(both, (x, skip, w, b, sb))
    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, skip, w, b, sb), both(x, skip, w, b, sb), rtol=0, atol=0)
