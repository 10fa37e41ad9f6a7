"""The "reference" backend as a backend: torch.compile(fullgraph=True) of every op with every option,
forward and backward, against the same calls in float64 eager mode (issue #15: data-dependent Python
branches such as an out-of-range check on the host made Dynamo fail with "Could not guard on
data-dependent expression")."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close

import fusedloss

N, C, D = 12, 11, 7


def _ce(x, t, w, reduction):
    return fusedloss.cross_entropy(x, t, w, ignore_index=-100, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                   softcap=5.0, temperature=0.7, return_lse=True, backend="reference")


def _cases(device):
    """name -> (function of the differentiable tensors, those tensors in float32, the constants)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    t = torch.randint(0, C, (N,), generator=g).to(device)
    t[2] = -100
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    alpha = torch.rand(C, generator=g).to(device)
    probs = torch.softmax(randn(N, C), 1)
    t3 = torch.randint(0, C, (2, 6), generator=g).to(device)
    t3[0, 1] = -100
    W = randn(C, D)
    return {
        **{f"cross_entropy-{r}": (lambda x, r=r: _ce(x, t, w, r), [randn(N, C)]) for r in ("none", "mean", "sum")},
        "cross_entropy-probabilities": (lambda x: fusedloss.cross_entropy(
            x, probs, w, label_smoothing=0.2, z_loss=1e-3, backend="reference"), [randn(N, C)]),
        "cross_entropy-spatial": (lambda x: fusedloss.cross_entropy(
            x.view(2, 6, C).transpose(1, 2), t3, w, reduction="none", backend="reference"), [randn(N, C)]),
        "cross_entropy-unbatched": (lambda x: fusedloss.cross_entropy(
            x, t[:1], w, label_smoothing=0.1, backend="reference"), [randn(C)]),
        "focal_loss": (lambda x: fusedloss.focal_loss(x, t, 2.0, alpha, weight=w, backend="reference"),
                       [randn(N, C)]),
        "focal_loss-float-alpha": (lambda x: fusedloss.focal_loss(
            x, t, 0.5, 0.25, weight=w, reduction="none", backend="reference"), [randn(N, C)]),
        "gap_loss": (lambda x: fusedloss.gap_loss(x, t, 0.7, p=2, weight=w, class_normalize=True,
                                                  backend="reference"), [randn(N, C)]),
        "gap_loss-max": (lambda x: fusedloss.gap_loss(x, t, 0.3, weight=w, mode="max", reduction="sum",
                                                      backend="reference"), [randn(N, C)]),
        "multi_margin_loss-0dim": (lambda x: fusedloss.gap_loss(x, t[:1] * 0, class_normalize=True, reduction="none",
                                                                backend="reference"), [randn(())]),
        "linear_cross_entropy": (lambda x, W, b: fusedloss.linear_cross_entropy(
            x, W, t, linear_bias=b, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, return_lse=True,
            backend="reference"), [randn(N, D), W, randn(C)]),
        "linear_cross_entropy-shift": (lambda x, W: fusedloss.linear_cross_entropy(
            x.view(2, 6, D), W, t3, weight=w, shift=1, reduction="none", backend="reference"), [randn(N, D), W]),
        "info_nce": (lambda q, k, temp: fusedloss.info_nce(
            q, k, torch.arange(N, device=device).flip(0), temperature=temp, backend="reference"),
            [randn(N, D), randn(N + 3, D), torch.tensor(0.1, device=device)]),
        "info_nce-symmetric": (lambda q, k: fusedloss.info_nce(
            q, k, symmetric=True, normalize=False, reduction="none", backend="reference"), [randn(N, D), randn(N, D)]),
    }


def _scalar(out, weights):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * g).sum() for o, g in zip(outs, weights))


CASES = list(_cases("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_compile_fullgraph_against_float64(device, case):
    fn, tensors = _cases(device)[case]
    eager64 = [v.double().requires_grad_() for v in tensors]
    ref = fn(*eager64)
    refs = ref if isinstance(ref, tuple) else (ref,)
    weights = [torch.randn(r.shape, device=device) for r in refs]
    ref_grads = torch.autograd.grad(_scalar(ref, [g.double() for g in weights]), eager64)

    torch._dynamo.reset()
    # Dynamo's trace and AOT autograd are what a data-dependent branch breaks; Inductor's code generation
    # (slow on 2 cores) runs on the first case only.
    compiler = "inductor" if case == CASES[0] else "aot_eager"
    compiled = torch.compile(lambda *args: fn(*args), fullgraph=True, backend=compiler)
    ours_in = [v.clone().requires_grad_() for v in tensors]
    out = compiled(*ours_in)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(_scalar(out, weights), ours_in)
    for o, r in zip(outs, refs):
        assert_close(o, r, torch.float32, "loss", case)
    for gr, r in zip(grads, ref_grads):
        assert_close(gr, r, torch.float32, "grad", case)


def test_compiled_out_of_range_target_is_a_nan_row():
    """Under torch.compile the reference does not read targets on the host (eager CPU raises IndexError):
    an out-of-range target's row is NaN, as on the GPU backends."""
    x = torch.randn(3, 5)
    t = torch.tensor([0, 7, 1])
    with pytest.raises(IndexError):
        fusedloss.cross_entropy(x, t, reduction="none", backend="reference")
    torch._dynamo.reset()
    out = torch.compile(lambda x: fusedloss.cross_entropy(x, t, reduction="none", backend="reference"),
                        fullgraph=True)(x)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
