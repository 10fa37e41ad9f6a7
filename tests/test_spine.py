"""The op spine: the public-level ops (one schema for the C++ op and its Triton twin, autograd in C++ for
the C++ op) and the kernel-side reduction they share (reduce_rows), against float64 formulas."""

from __future__ import annotations

import re

import pytest
import torch

import fusedloss
from fusedloss import _backend
from fusedloss.ops import _registry
from fusedloss.ops import cross_entropy as ce_ops
from fusedloss.ops import focal_loss as focal_ops
from fusedloss.ops import gap_loss as gap_ops
from fusedloss.ops import info_nce as nce_ops
from fusedloss.ops import kl_div as kl_ops
from fusedloss.ops import linear_cross_entropy as lce_ops
from fusedloss.ops import siglip as siglip_ops
from fusedloss.ops import soft_cross_entropy as soft_ops
from conftest import assert_close, backend_params, require_backend, rows, with_reference

SPECS = {"cross_entropy": ce_ops.SCHEMA, "focal_loss": focal_ops.SCHEMA, "gap_loss": gap_ops.SCHEMA}


def _normalized(schema: str) -> str:
    return re.sub(r"\s+", " ", schema).strip()


def _inferred(name: str, schema: str) -> str:
    """The schema a triton_op that ignores ``schema=`` (torch 2.11) infers from ``_typed``'s signature."""
    inferred = torch.library.infer_schema(_registry._typed(lambda *args: None, schema), mutates_args=())
    return str(torch._C.parse_schema(f"fusedloss::{name}{inferred}"))


def _is_twin_schema(twin: str, name: str, schema: str) -> bool:
    """The Triton twin's registered schema is the declared one (torch takes ``schema=``) or the one
    inferred from its signature (torch 2.11)."""
    return _normalized(twin) in (_normalized(f"fusedloss::{name}{schema}"), _normalized(_inferred(name, schema)))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_triton_twin_has_the_cpp_schema(name):
    """The Python spec's schema (the Triton twin's) is the one csrc/registration.cpp declares."""
    if not _backend.extension_loaded():
        pytest.skip("the compiled extension is not loaded")
    cpp = str(getattr(torch.ops.fusedloss, name).default._schema)
    assert _normalized(cpp) == _normalized(f"fusedloss::{name}{SPECS[name]}")
    if _backend.triton_installed():
        twin = str(getattr(torch.ops.fusedloss, f"{name}_triton").default._schema)
        assert _is_twin_schema(twin, f"{name}_triton", SPECS[name])


PAIRS = {p.name: p for p in (ce_ops.KERNELS, focal_ops.KERNELS, gap_ops.KERNELS, kl_ops.KERNELS, siglip_ops.KERNELS,
                                  soft_ops.KERNELS, nce_ops.KERNELS)}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_kernel_pair_schemas_are_the_cpp_ones(name):
    """A KernelPair's declared schemas (its Triton twins') are the ones the C++ ops have."""
    pair = PAIRS[name]
    if not pair.present("cpp"):
        pytest.skip("the compiled extension is not loaded")
    declared = [("fwd", pair.fwd_schema)] + ([("bwd", pair.bwd_schema)] if pair.bwd_schema is not None else [])
    for kind, schema in declared:
        cpp = str(getattr(torch.ops.fusedloss, f"{name}_{kind}").default._schema)
        assert _normalized(cpp) == _normalized(f"fusedloss::{name}_{kind}{schema}")
        if pair.present("triton"):
            twin = str(getattr(torch.ops.fusedloss, f"{name}_{kind}_triton").default._schema)
            assert _is_twin_schema(twin, f"{name}_{kind}_triton", schema)


DECLARED = {**SPECS, "linear_cross_entropy": lce_ops.SCHEMA,
            **{f"{p.name}_fwd": p.fwd_schema for p in PAIRS.values()},
            **{f"{p.name}_bwd": p.bwd_schema for p in PAIRS.values() if p.bwd_schema is not None},
            # Triton only (no C++ op to agree with): info_nce's 16-bit rows, normalized in the kernels
            "info_nce_lse_normed_fwd": nce_ops.NORMED.fwd_schema, "info_nce_lse_normed_bwd": nce_ops.NORMED.bwd_schema,
            "siglip_rows_fwd": siglip_ops.ROWS.fwd_schema, "siglip_rows_bwd": siglip_ops.ROWS.bwd_schema}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_twin_signature_gives_its_schema(name):
    """torch 2.11's triton_op infers a twin's schema from its function's signature and ignores
    ``schema=``: the signature ``_typed`` writes from a declared schema infers that schema again, up to
    what inference cannot write (an int argument is a SymInt, the results have no names)."""
    def loose(schema: str) -> str:
        args, results = _normalized(schema).split(" -> ")
        return re.sub(r"\bSymInt\b", "int", args) + " -> " + re.sub(r"(Tensor\??) \w+(?=[,)])", r"\1", results)

    schema = DECLARED[name]
    assert loose(_inferred("x", schema)) == loose(str(torch._C.parse_schema(f"fusedloss::x{schema}")))


def _reduce_reference(loss, target, weight, token_weight, ignore_index, mean):
    kept = target != ignore_index
    u = token_weight.double() if token_weight is not None else torch.ones_like(loss, dtype=torch.float64)
    w = weight.double()[target.clamp(0, weight.numel() - 1)] if weight is not None else torch.ones_like(u)
    total = (kept * u * loss.double()).sum()
    mass = (kept * u * w).sum()
    return (total / mass if mean else total), mass


def _reduce(backend, *args):
    if backend == "triton":
        from fusedloss.triton import reduce as kernels

        return kernels.reduce_rows(*args)
    return torch.ops.fusedloss.reduce_rows(*args)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 4096 * 5 + 3, (1 << 16) + 1001])
@pytest.mark.parametrize("weights", ["none", "class", "token", "both"])
@pytest.mark.parametrize("mean", [False, True])
def test_reduce_rows_against_float64(backend, device, dtype, n, weights, mean):
    require_backend(backend, device)
    if backend == "triton" and device == "cpu" and n > 4096 * 5 + 3:
        n = (1 << 16) + 1001  # keeps the multi-program path; one size under the interpreter
    C = 11
    loss = torch.rand(n, dtype=dtype, device=device) * 10
    target = torch.randint(0, C, (n,), device=device)
    target[::5] = -100
    loss[target == -100] = 0
    weight = torch.rand(C, dtype=dtype, device=device) + 0.5 if weights in ("class", "both") else None
    token = torch.rand(n, dtype=dtype, device=device) if weights in ("token", "both") else None
    out, mass = _reduce(backend, loss, target, weight, token, -100, mean)
    ref_out, ref_mass = _reduce_reference(loss, target, weight, token, -100, mean)
    assert out.shape == () and mass.shape == () and out.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 2e-7  # a double accumulator, rounded once
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(mass.double().cpu(), ref_mass.cpu(), rtol=rtol, atol=0)


@pytest.mark.parametrize("backend,device", backend_params())
def test_reduce_rows_all_ignored_mean_is_nan(backend, device):
    require_backend(backend, device)
    loss = torch.zeros(5, device=device)
    target = torch.full((5,), -100, device=device)
    out, mass = _reduce(backend, loss, target, None, None, -100, True)
    assert torch.isnan(out).item() and mass.item() == 0


def test_reduce_rows_thread_count_independent():
    """Blocks of a fixed size, merged in order: the same bits with one and two threads."""
    n = 4096 * 37 + 5
    loss = torch.rand(n) * 100
    target = torch.randint(0, 7, (n,))
    weight = torch.rand(7) + 0.1
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.fusedloss.reduce_rows(loss, target, weight, None, -100, True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_reduce_rows_bad_input():
    loss = torch.rand(4)
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.fusedloss.reduce_rows(loss, torch.zeros(3, dtype=torch.int64), None, None, -100, True)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fusedloss.reduce_rows(loss, torch.zeros(4, dtype=torch.int64), torch.rand(3).double(), None, -100,
                                        True)
    with pytest.raises(RuntimeError, match="token_weight must be"):
        torch.ops.fusedloss.reduce_rows(loss, torch.zeros(4, dtype=torch.int64), None, torch.rand(5), -100, True)


def _public_args(name, device, dtype, reduction):
    x = torch.randn(rows("cpu", device, 13), 9, dtype=dtype, device=device, requires_grad=True)
    t = torch.randint(0, 9, (x.shape[0],), device=device)
    t[2] = -100
    w = torch.rand(9, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device) + 0.5
    u = torch.rand(x.shape[0], dtype=w.dtype, device=device) + 0.25  # token weights
    r = _registry.REDUCTION[reduction]
    if name == "cross_entropy":
        return (x, t, w, u, -100, r, 0.1, 1e-3, 0.0, 1.0, True)  # with the extras (logprob, entropy)
    if name == "focal_loss":
        return (x, t, w * 0.7, w, u, -100, r, 2.0)
    return (x, t, w, 0.5, 2, -100, False, False, r)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_public_op_opcheck(name, reduction):
    """The C++ op with its C++ autograd passes torch.library's checks (schema, fake, autograd, AOT)."""
    require_backend("cpu", "cpu")
    args = _public_args(name, "cpu", torch.float32, reduction)
    torch.library.opcheck(getattr(torch.ops.fusedloss, name).default, args)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_public_op_inference_mode(name):
    """Under inference_mode the autograd kernel is skipped: the CompositeExplicitAutograd kernel runs
    and gives the same loss."""
    require_backend("cpu", "cpu")
    args = _public_args(name, "cpu", torch.float32, "mean")
    op = getattr(torch.ops.fusedloss, name).default
    expected = op(*args)[0]
    with torch.inference_mode():
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        got = op(*detached)[0]
    assert torch.equal(got, expected.detach())


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("name", sorted(SPECS))
def test_double_backward_raises(backend, device, name):
    """create_graph=True computes the gradient; differentiating it again says there is none."""
    require_backend(backend, device)
    args = _public_args(name, device, torch.float32, "mean")
    op = _registry_op(name).op(backend)
    x = args[0]
    (g,) = torch.autograd.grad(op(*args)[0], x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


def _node_calls():
    """A loss of each op whose autograd is a backward node of csrc/autograd.cpp, on CPU."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 11, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (7,), generator=g)
    h = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.randn(11, 5, generator=g, requires_grad=True)
    q = torch.randn(6, 5, generator=g, requires_grad=True)
    k = torch.randn(6, 5, generator=g, requires_grad=True)
    return {
        "cross_entropy": lambda: fusedloss.cross_entropy(x, t, backend="cpu"),
        "cross_entropy extras": lambda: sum(o.sum() for o in fusedloss.cross_entropy(
            x, t, reduction="none", return_lse=True, return_logprob=True, return_entropy=True, backend="cpu")),
        "focal_loss": lambda: fusedloss.focal_loss(x, t, backend="cpu"),
        "gap_loss": lambda: fusedloss.gap_loss(x, t, backend="cpu"),
        "linear_cross_entropy none": lambda: fusedloss.linear_cross_entropy(h, w, t, reduction="none",
                                                                            backend="cpu").sum(),
        "linear_cross_entropy mean": lambda: fusedloss.linear_cross_entropy(h, w, t, backend="cpu"),
        "info_nce none": lambda: fusedloss.info_nce(q, k, reduction="none", backend="cpu").sum(),
        "info_nce mean": lambda: fusedloss.info_nce(q, k, backend="cpu"),
    }


@pytest.mark.parametrize("case", sorted(_node_calls()))
def test_backward_node_second_backward_is_refused(case):
    """A backward without retain_graph releases the node's saved tensors: a second one fails with
    torch's message (linear cross-entropy's reduced loss, whose gradients were made in the forward, its
    own) instead of reading freed or stale buffers."""
    require_backend("cpu", "cpu")
    loss = _node_calls()[case]()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|ran twice"):
        loss.backward()


def _forward_ad_calls(backend):
    """Every public loss with its first floating input as the argument d, (7, 11) floats."""
    t = torch.randint(0, 11, (7,))
    probs = torch.softmax(torch.randn(7, 11), 1)
    kw = {"backend": backend}
    return {
        "cross_entropy": lambda d: fusedloss.cross_entropy(d, t, **kw),
        "cross_entropy probabilities": lambda d: fusedloss.cross_entropy(d, probs, **kw),
        "focal_loss": lambda d: fusedloss.focal_loss(d, t, **kw),
        "gap_loss": lambda d: fusedloss.gap_loss(d, t, **kw),
        "linear_cross_entropy": lambda d: fusedloss.linear_cross_entropy(d, torch.randn(11, 11), t, **kw),
        "info_nce mean": lambda d: fusedloss.info_nce(d, torch.randn(7, 11), **kw),
        "info_nce none": lambda d: fusedloss.info_nce(d, torch.randn(7, 11), reduction="none", **kw),
        "siglip_loss": lambda d: fusedloss.siglip_loss(d, torch.randn(7, 11), **kw),
        "kl_div_logits": lambda d: fusedloss.kl_div_logits(d, torch.randn(7, 11), **kw),
        "jsd_logits": lambda d: fusedloss.jsd_logits(d, torch.randn(7, 11), **kw),
        "linear_kl_div": lambda d: fusedloss.linear_kl_div(d, torch.randn(13, 11), torch.randn(7, 11),
                                                          torch.randn(13, 11), **kw),
        "linear_jsd": lambda d: fusedloss.linear_jsd(d, torch.randn(13, 11), torch.randn(7, 11),
                                                    torch.randn(13, 11), **kw),
    }


@pytest.mark.parametrize("backend,device", [p for p in with_reference(["cpu"]) if p.values[1] == "cpu"])
@pytest.mark.parametrize("case", sorted(_forward_ad_calls("cpu")))
def test_forward_ad_is_refused(backend, device, case):
    """The kernels have no forward-mode formula: a dual input is refused on every kernel backend (the
    Python autograd of torch.library would otherwise drop its tangent without a word), through
    torch.autograd.forward_ad and torch.func.jvp alike; the reference backend (plain PyTorch) has one."""
    require_backend(backend, device)
    import torch.autograd.forward_ad as fwAD

    call = _forward_ad_calls(backend)[case]
    x = torch.randn(7, 11)
    if backend == "reference":
        _, tangent = torch.func.jvp(call, (x,), (torch.ones(7, 11),))
        assert torch.isfinite(tangent).all()
        return
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            call(fwAD.make_dual(x, torch.ones(7, 11)))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(call, (x,), (torch.ones(7, 11),))


def test_backward_node_keeps_no_reference_cycle():
    """InfoNCE's kernel op saves its own differentiable outputs for the backward: saved without their
    grad_fn (is_output), they are freed with the last user reference, not kept alive by a cycle
    node -> output -> node."""
    require_backend("cpu", "cpu")
    import gc
    import weakref

    q = torch.randn(5, 4, requires_grad=True)
    k = torch.randn(5, 4, requires_grad=True)
    enabled = gc.isenabled()
    gc.disable()  # a cycle would then stay until the next collection
    try:
        out = torch.ops.fusedloss.info_nce_lse_fwd(q, k, torch.tensor(10.0), True, None, None)
        refs = [weakref.ref(t) for t in out[:3]]
        del out
        assert all(r() is None for r in refs)
    finally:
        if enabled:
            gc.enable()


def _registry_op(name):
    return {"cross_entropy": ce_ops.CROSS_ENTROPY, "focal_loss": focal_ops.FOCAL_LOSS, "gap_loss": gap_ops.GAP_LOSS}[name]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_compile_fullgraph_public_ops_match_float64(reduction):
    """torch.compile(fullgraph=True) of the three losses on the cpu backend, forward and backward,
    against the float64 reference."""
    require_backend("cpu", "cpu")
    x = torch.randn(17, 10)
    t = torch.randint(0, 10, (17,))
    t[3] = -100
    w = torch.rand(10) + 0.5

    def step(x):
        return (fusedloss.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, backend="cpu").sum()
                + fusedloss.focal_loss(x, t, 1.5, weight=w, reduction=reduction, backend="cpu").sum()
                + fusedloss.gap_loss(x, t, 0.5, weight=w, reduction=reduction, backend="cpu").sum())

    def reference(x):
        ref = fusedloss.reference
        return (ref.cross_entropy(x, t, w.double(), reduction=reduction, label_smoothing=0.1).sum()
                + ref.focal_loss(x, t, 1.5, weight=w.double(), reduction=reduction).sum()
                + ref.gap_loss(x, t, 0.5, weight=w.double(), reduction=reduction).sum())

    torch._dynamo.reset()
    xc = x.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True)(xc)
    out.backward()
    xr = x.double().requires_grad_()
    expected = reference(xr)
    expected.backward()
    assert_close(out, expected, torch.float32, "loss", "compiled")
    assert_close(xc.grad, xr.grad, torch.float32, "grad", "compiled")


def _direct(name):
    direct = _registry_op(name)._cpp_direct
    if direct is None:
        pytest.skip("the compiled extension has no direct call (built before csrc/python_call.cpp)")
    return direct


@pytest.mark.parametrize("name", sorted(SPECS))
def test_direct_call_is_the_torch_ops_call(name):
    """fusedloss._C.call (what the functional API calls in eager mode) gives what torch.ops gives: the
    same outputs, bit for bit, and the same gradient through the C++ autograd."""
    require_backend("cpu", "cpu")
    args = _public_args(name, "cpu", torch.float32, "mean")
    x = args[0]
    expected = getattr(torch.ops.fusedloss, name).default(*args)
    (g_expected,) = torch.autograd.grad(expected[0], x)
    got = _direct(name)(*args)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert got[0].grad_fn is not None
    (g,) = torch.autograd.grad(got[0], x)
    assert torch.equal(g, g_expected)


class _Tagged(torch.Tensor):
    """A tensor subclass with __torch_function__: the direct call must leave it to torch.ops."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_direct_call_leaves_torch_function_to_torch_ops():
    """A __torch_function__ subclass, a TorchFunctionMode, a wrong argument kind: the OpOverload takes
    the call, so they see it (and errors are torch.ops' own)."""
    require_backend("cpu", "cpu")
    direct = _direct("cross_entropy")
    op = torch.ops.fusedloss.cross_entropy.default
    args = _public_args("cross_entropy", "cpu", torch.float32, "mean")
    _Tagged.seen.clear()
    direct(args[0].detach().as_subclass(_Tagged), *args[1:])
    assert op in _Tagged.seen

    class Mode(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode() as mode:
        direct(*args)
    assert op in mode.seen
    with pytest.raises(RuntimeError) as via_ops:
        op(*args[:3], "x", *args[4:])
    with pytest.raises(RuntimeError) as via_direct:
        direct(*args[:3], "x", *args[4:])
    assert str(via_direct.value) == str(via_ops.value)
