"""The op table of the cross-cutting tests (test_hardening.py, test_properties.py, bad_input_child.py).

One ``Op`` entry per loss says how to make a small valid call, which arguments get gradients, the bad
inputs it must refuse, how to call gradcheck on it and how hypothesis draws its cases. Adding an op to
every hardening test is adding one entry to ``OPS``.

Calls are keyword calls of the functional API: ``op.fn(**kwargs, backend=...)``; the reference takes
the same keywords minus ``op.kernel_only`` (kernel tuning knobs such as ``chunk_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference

BACKENDS_BY_DEVICE = {"cpu": ("cpu", "triton", "reference"), "cuda": ("cuda", "triton", "reference")}


def nan_rows_allowed(backend: str, device: str) -> bool:
    """Where an out-of-range target cannot raise without a host sync, its row's loss (and gradient)
    is NaN instead (README, "Semantics worth knowing"): the GPU kernel backends, and every backend
    off the CPU."""
    return backend in ("cuda", "triton") or device != "cpu"


def other_device(device: str) -> str:
    """A device the inputs are not on: CUDA inputs get a CPU stray, CPU inputs a meta one."""
    return "cpu" if device == "cuda" else "meta"


@dataclass(frozen=True)
class Bad:
    """One bad call: ``change(kwargs, device)`` turns a valid call's keyword arguments into the bad ones.

    It must raise one of ``errors`` with each of ``names`` in the message, or, where ``nan_row`` is
    set and nan_rows_allowed(backend, device) (targets are not read on the host), return a
    ``reduction="none"`` loss that is NaN exactly in row ``nan_row``. ``any_backend``: the case does
    not depend on the backend asked for (it overrides it): it runs once per device.
    """

    id: str
    change: Callable[[dict, str], dict]
    errors: tuple[type[BaseException], ...]
    names: tuple[str, ...]
    nan_row: int | None = None
    any_backend: bool = False


def _set(**changes):
    return lambda kw, device: {**kw, **changes}


def _with(key, fn):
    """kwargs with kwargs[key] replaced by fn(kwargs[key], device)."""
    return lambda kw, device: {**kw, key: fn(kw[key], device)}


def _stray(key):
    return _with(key, lambda v, device: v.to(other_device(device)))


def common_bad(first: str) -> list[Bad]:
    """Cases every op shares; ``first`` names its first tensor argument."""
    return [
        Bad("reduction-unknown", _set(reduction="avg"), (ValueError,), ("reduction",)),
        Bad("reduction-none-object", _set(reduction=None), (ValueError,), ("reduction",)),
        Bad(f"{first}-not-a-tensor", _with(first, lambda v, d: v.tolist()), (TypeError,), (first,)),
        Bad(f"{first}-integer", _with(first, lambda v, d: v.long()), (TypeError,), (first,)),
        Bad(f"{first}-complex", _with(first, lambda v, d: v.to(torch.complex64)), (TypeError,), (first,)),
        Bad("backend-unknown", _set(backend="tpu"), (ValueError,), ("backend",), any_backend=True),
        Bad("backend-empty-name", _set(backend=""), (ValueError,), ("backend",), any_backend=True),
        # the backend of the other device: cuda for CPU tensors, cpu for CUDA tensors
        Bad("backend-wrong-device", lambda kw, d: {**kw, "backend": "cpu" if d == "cuda" else "cuda"},
            (RuntimeError,), ("backend",), any_backend=True),
    ]


def target_range_bad(key: str, n_classes: int) -> list[Bad]:
    """Out-of-range class indices in row 1 (positive, negative, and -101 next to ignore_index=-100)."""
    def put(value):
        def change(kw, device):
            t = kw[key].clone()
            t[1] = value
            return {**kw, key: t, "reduction": "none"}
        return change
    return [Bad(f"{key}-{label}", put(value), (IndexError,), (key,), nan_row=1)
            for label, value in (("equal-to-C", n_classes), ("huge", 2**40), ("minus-1", -1), ("minus-101", -101),
                                 ("int64-min", -2**63))]


def smoothing_bad() -> list[Bad]:
    return [Bad(f"label_smoothing-{v}", _set(label_smoothing=v), (ValueError,), ("label_smoothing",))
            for v in (-0.1, 1.5, float("nan"))] + [
        Bad("label_smoothing-str", _set(label_smoothing="0.1"), (TypeError,), ("label_smoothing",)),
        Bad("z_loss-negative", _set(z_loss=-1.0), (ValueError,), ("z_loss",)),
        Bad("softcap-zero", _set(softcap=0.0), (ValueError,), ("softcap",)),
        Bad("ignore_index-float", _set(ignore_index=1.5), (TypeError,), ("ignore_index",)),
        Bad("ignore_index-str", _set(ignore_index="x"), (TypeError,), ("ignore_index",)),
    ]


def weight_bad(n_classes: int) -> list[Bad]:
    return [
        Bad("weight-length", _set(weight=torch.ones(n_classes - 1)), (ValueError,), ("weight",)),
        Bad("weight-2d", _set(weight=torch.ones(1, n_classes)), (ValueError,), ("weight",)),
        Bad("weight-integer", _set(weight=torch.ones(n_classes, dtype=torch.long)), (TypeError,), ("weight",)),
        Bad("weight-other-device", lambda kw, d: {**kw, "weight": torch.ones(n_classes, device=other_device(d))},
            (RuntimeError,), ("weight",)),
    ]


@dataclass(frozen=True)
class Edge:
    """An edge input whose answer is torch's: ``make(device)`` gives the keyword arguments (options
    included, reduction excluded); every floating tensor but ``weight`` is a leaf that gets a gradient.
    ``view`` maps those leaves to what the op is called with (expanded, transposed, channels-last
    views), so the gradient flows back through the view as it would in a model. ``twin`` is torch's
    function with the same keywords, run on float32 copies of the leaves; None means the float64
    reference (where torch has no twin, or where the twin's answer is an artefact, said in ``why``).
    """

    id: str
    make: Callable[[str], dict]
    twin: Callable | None = None
    view: Callable[[dict], dict] | None = None
    why: str = ""


def _nonfinite_rows(device, dtype=torch.float32, C=6):
    """Rows of NaN, +-inf, all -inf, all +inf, +inf and -inf together, next to finite rows."""
    x = torch.randn(8, C, device=device)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2, 1] = float("-inf")
    x[4] = float("-inf")
    x[5] = float("inf")
    x[6, 0], x[6, 1] = float("-inf"), float("inf")
    return x.to(dtype)


def _huge_rows(device, C=6):
    """Logits of +-1e30 (finite in float32, inf in float16): all equal, mixed signs, one alone."""
    x = torch.randn(5, C, device=device)
    x[0] = 1e30
    x[1] = -1e30
    x[2, ::2], x[2, 1::2] = 1e30, -1e30
    x[3, 1] = 1e30
    return x


def _fp16_max_rows(device, C=7):
    x = torch.full((4, C), 65504.0, device=device)
    x[1] = -65504.0
    x[2, ::2], x[2, 1::2] = 65504.0, -65504.0
    x[3] = torch.randn(C, device=device)
    x[3, 2] = 65504.0
    return x.half()


def _targets(n, C, device):
    return torch.tensor([2, 3, 1, 0, 0, 1, 0, 5, 4, 6][:n], dtype=torch.long, device=device) % C


def _as(**fixed):
    """make(device) for keyword arguments that need only the device for their tensors."""
    return lambda device: {k: v(device) if callable(v) else v for k, v in fixed.items()}


def _expand_rows(key, n):
    return lambda kw: {**kw, key: kw[key].expand(n, *kw[key].shape[1:])}


def _transpose(key):
    return lambda kw: {**kw, key: kw[key].t()}


def _channels_last(key):
    return lambda kw: {**kw, key: kw[key].contiguous(memory_format=torch.channels_last)}


def _ce_twin(**kw):
    return F.cross_entropy(**kw)


CE_EDGES = (
    Edge("nonfinite", _as(input=lambda d: _nonfinite_rows(d), target=lambda d: _targets(8, 6, d)), _ce_twin),
    Edge("nonfinite-smoothing-weight", _as(input=lambda d: _nonfinite_rows(d), target=lambda d: _targets(8, 6, d),
                                           weight=lambda d: torch.rand(6, device=d) + 0.5, label_smoothing=0.1),
         _ce_twin),
    Edge("nonfinite-bf16", _as(input=lambda d: _nonfinite_rows(d, torch.bfloat16), target=lambda d: _targets(8, 6, d)),
         _ce_twin),
    Edge("nonfinite-fp16", _as(input=lambda d: _nonfinite_rows(d, torch.float16), target=lambda d: _targets(8, 6, d)),
         _ce_twin),
    Edge("1e30", _as(input=_huge_rows, target=lambda d: _targets(5, 6, d)), _ce_twin),
    Edge("1e30-smoothing", _as(input=_huge_rows, target=lambda d: _targets(5, 6, d), label_smoothing=0.2), _ce_twin),
    Edge("fp16-max", _as(input=_fp16_max_rows, target=lambda d: _targets(4, 7, d), label_smoothing=0.1), _ce_twin),
    Edge("all-ignored", _as(input=lambda d: torch.randn(3, 7, device=d),
                            target=lambda d: torch.full((3,), -100, device=d)), _ce_twin),
    Edge("all-ignored-weight-smoothing", _as(input=lambda d: torch.randn(3, 7, device=d),
                                             target=lambda d: torch.full((3,), 4, device=d), ignore_index=4,
                                             weight=lambda d: torch.rand(7, device=d), label_smoothing=0.3), _ce_twin),
    Edge("empty-batch", _as(input=lambda d: torch.randn(0, 5, device=d),
                            target=lambda d: torch.zeros(0, dtype=torch.long, device=d)), _ce_twin),
    Edge("empty-batch-weight", _as(input=lambda d: torch.randn(0, 5, device=d),
                                   target=lambda d: torch.zeros(0, dtype=torch.long, device=d),
                                   weight=lambda d: torch.rand(5, device=d)), _ce_twin),
    Edge("empty-kdim", _as(input=lambda d: torch.randn(2, 5, 0, device=d),
                           target=lambda d: torch.zeros(2, 0, dtype=torch.long, device=d)), _ce_twin),
    Edge("one-class", _as(input=lambda d: torch.randn(4, 1, device=d), target=lambda d: torch.zeros(4, dtype=torch.long,
                                                                                               device=d),
                          label_smoothing=0.3), _ce_twin),
    Edge("one-row-1d", _as(input=lambda d: torch.randn(7, device=d), target=lambda d: torch.tensor(3, device=d)),
         _ce_twin),
    Edge("one-row-2d", _as(input=lambda d: torch.randn(1, 9, device=d), target=lambda d: torch.tensor([8], device=d)),
         _ce_twin),
    Edge("transposed", _as(input=lambda d: torch.randn(7, 5, device=d), target=lambda d: _targets(5, 7, d)), _ce_twin,
         view=_transpose("input")),
    Edge("expanded-rows", _as(input=lambda d: torch.randn(1, 7, device=d), target=lambda d: _targets(5, 7, d)),
         _ce_twin, view=_expand_rows("input", 5)),
    Edge("expanded-classes", _as(input=lambda d: torch.randn(5, 1, device=d), target=lambda d: _targets(5, 7, d)),
         _ce_twin, view=lambda kw: {**kw, "input": kw["input"].expand(5, 7)}),
    Edge("expanded-target", _as(input=lambda d: torch.randn(5, 7, device=d),
                                target=lambda d: torch.tensor(2, device=d)),
         _ce_twin, view=lambda kw: {**kw, "target": kw["target"].expand(5)}),
    Edge("channels-last", _as(input=lambda d: torch.randn(2, 7, 2, 3, device=d),
                              target=lambda d: torch.randint(0, 7, (2, 2, 3), device=d),
                              weight=lambda d: torch.rand(7, device=d), label_smoothing=0.1), _ce_twin,
         view=_channels_last("input")),
    Edge("channels-last-bf16", _as(input=lambda d: torch.randn(2, 7, 2, 3, device=d).bfloat16(),
                                   target=lambda d: torch.randint(0, 7, (2, 2, 3), device=d)), _ce_twin,
         view=_channels_last("input")),
)


def _focal_ce_twin(*, gamma, alpha=None, **kw):
    """torch's cross-entropy is focal loss at gamma = 0 with no alpha (test_focal_loss checks the
    reference against it); torch has no multi-class focal loss for gamma > 0."""
    assert gamma == 0.0 and alpha is None
    return F.cross_entropy(**kw)


NO_FOCAL_TWIN = "torch has no multi-class focal loss (torchvision's is the binary sigmoid form): the float64 reference"


def _focal_targets(n, C, device):
    """_targets with row 2's target moved off its -inf logit: there the focal coefficient's limit (1) makes
    the kernels' gradient finite, softmax - onehot, where the reference's autograd through the formula
    gives 0 * inf = NaN (test_focal_loss.test_one_hot_rows checks that row; the gamma = 0 edges, against
    torch, keep it)."""
    t = _targets(n, C, device)
    t[2] = 3
    return t


def _fl(gamma=2.0, **fixed):
    return _as(gamma=gamma, **fixed)


FOCAL_EDGES = (
    Edge("nonfinite-gamma0", _fl(0.0, input=lambda d: _nonfinite_rows(d), target=lambda d: _targets(8, 6, d),
                                 weight=lambda d: torch.rand(6, device=d) + 0.5), _focal_ce_twin),
    Edge("nonfinite", _fl(input=lambda d: _nonfinite_rows(d), target=lambda d: _focal_targets(8, 6, d), alpha=0.25),
         None, why=NO_FOCAL_TWIN),
    Edge("nonfinite-alpha-weight", _fl(0.5, input=lambda d: _nonfinite_rows(d),
                                       target=lambda d: _focal_targets(8, 6, d),
                                       alpha=lambda d: torch.rand(6, device=d),
                                       weight=lambda d: torch.rand(6, device=d) + 0.5), None, why=NO_FOCAL_TWIN),
    Edge("nonfinite-bf16", _fl(input=lambda d: _nonfinite_rows(d, torch.bfloat16),
                               target=lambda d: _focal_targets(8, 6, d)), None, why=NO_FOCAL_TWIN),
    Edge("nonfinite-fp16", _fl(0.0, input=lambda d: _nonfinite_rows(d, torch.float16),
                               target=lambda d: _targets(8, 6, d)), _focal_ce_twin),
    Edge("1e30-gamma0", _fl(0.0, input=_huge_rows, target=lambda d: _targets(5, 6, d)), _focal_ce_twin),
    Edge("1e30", _fl(input=_huge_rows, target=lambda d: _targets(5, 6, d), alpha=0.5), None, why=NO_FOCAL_TWIN),
    Edge("fp16-max", _fl(1.5, input=_fp16_max_rows, target=lambda d: _targets(4, 7, d)), None, why=NO_FOCAL_TWIN),
    Edge("fp16-max-gamma0", _fl(0.0, input=_fp16_max_rows, target=lambda d: _targets(4, 7, d)), _focal_ce_twin),
    Edge("all-ignored", _fl(input=lambda d: torch.randn(3, 7, device=d),
                            target=lambda d: torch.full((3,), -100, device=d)), None, why=NO_FOCAL_TWIN),
    Edge("all-ignored-weight-alpha", _fl(0.5, input=lambda d: torch.randn(3, 7, device=d),
                                         target=lambda d: torch.full((3,), 4, device=d), ignore_index=4,
                                         weight=lambda d: torch.rand(7, device=d),
                                         alpha=lambda d: torch.rand(7, device=d)), None, why=NO_FOCAL_TWIN),
    Edge("empty-batch", _fl(input=lambda d: torch.randn(0, 5, device=d),
                            target=lambda d: torch.zeros(0, dtype=torch.long, device=d)), None, why=NO_FOCAL_TWIN),
    Edge("empty-batch-weight", _fl(0.0, input=lambda d: torch.randn(0, 5, device=d),
                                   target=lambda d: torch.zeros(0, dtype=torch.long, device=d),
                                   weight=lambda d: torch.rand(5, device=d)), _focal_ce_twin),
    Edge("empty-kdim", _fl(input=lambda d: torch.randn(2, 5, 0, device=d),
                           target=lambda d: torch.zeros(2, 0, dtype=torch.long, device=d)), None, why=NO_FOCAL_TWIN),
    # one class: p_y = 1 exactly, so loss 0 and gradient 0 (the limit, for gamma < 1 too)
    Edge("one-class", _fl(0.5, input=lambda d: torch.randn(4, 1, device=d),
                          target=lambda d: torch.zeros(4, dtype=torch.long, device=d)), None, why=NO_FOCAL_TWIN),
    Edge("one-row-1d", _fl(input=lambda d: torch.randn(7, device=d), target=lambda d: torch.tensor(3, device=d),
                           alpha=0.25), None, why=NO_FOCAL_TWIN),
    Edge("one-row-2d", _fl(input=lambda d: torch.randn(1, 9, device=d), target=lambda d: torch.tensor([8], device=d)),
         None, why=NO_FOCAL_TWIN),
    Edge("transposed", _fl(input=lambda d: torch.randn(7, 5, device=d), target=lambda d: _targets(5, 7, d)), None,
         view=_transpose("input"), why=NO_FOCAL_TWIN),
    Edge("expanded-rows", _fl(input=lambda d: torch.randn(1, 7, device=d), target=lambda d: _targets(5, 7, d)),
         None, view=_expand_rows("input", 5), why=NO_FOCAL_TWIN),
    Edge("expanded-classes", _fl(input=lambda d: torch.randn(5, 1, device=d), target=lambda d: _targets(5, 7, d)),
         None, view=lambda kw: {**kw, "input": kw["input"].expand(5, 7)}, why=NO_FOCAL_TWIN),
    Edge("expanded-target", _fl(input=lambda d: torch.randn(5, 7, device=d),
                                target=lambda d: torch.tensor(2, device=d)),
         None, view=lambda kw: {**kw, "target": kw["target"].expand(5)}, why=NO_FOCAL_TWIN),
    Edge("channels-last", _fl(1.5, input=lambda d: torch.randn(2, 7, 2, 3, device=d),
                              target=lambda d: torch.randint(0, 7, (2, 2, 3), device=d),
                              weight=lambda d: torch.rand(7, device=d), alpha=lambda d: torch.rand(7, device=d)),
         None, view=_channels_last("input"), why=NO_FOCAL_TWIN),
    Edge("channels-last-bf16-gamma0", _fl(0.0, input=lambda d: torch.randn(2, 7, 2, 3, device=d).bfloat16(),
                                          target=lambda d: torch.randint(0, 7, (2, 2, 3), device=d)), _focal_ce_twin,
         view=_channels_last("input")),
)


def _gap_twin(input, target, *, margin, p=1, weight=None, reduction="mean", class_normalize=True):
    assert class_normalize
    return F.multi_margin_loss(input, target, p=p, margin=margin, weight=weight, reduction=reduction)


def _gap(**fixed):
    return _as(margin=0.5, class_normalize=True, **fixed)


GAP_EDGES = (
    Edge("nonfinite", _gap(input=lambda d: _nonfinite_rows(d), target=lambda d: _targets(8, 6, d)), _gap_twin),
    Edge("nonfinite-p2-weight", _gap(input=lambda d: _nonfinite_rows(d), target=lambda d: _targets(8, 6, d), p=2,
                                     weight=lambda d: torch.rand(6, device=d) + 0.5), _gap_twin),
    Edge("nonfinite-bf16", _gap(input=lambda d: _nonfinite_rows(d, torch.bfloat16), target=lambda d: _targets(8, 6, d)),
         _gap_twin),
    Edge("1e30", _gap(input=_huge_rows, target=lambda d: _targets(5, 6, d)), None,
         why="torch computes (margin - x_y) + x_j, which loses the margin next to 1e30 (the loss of a row of equal "
             "logits comes out 0); fusedloss computes (x_j - x_y) + margin, exact when x_j == x_y"),
    Edge("fp16-max", _gap(input=_fp16_max_rows, target=lambda d: _targets(4, 7, d)), _gap_twin),
    Edge("all-ignored", _gap(input=lambda d: torch.randn(3, 7, device=d), target=lambda d: torch.full((3,), -100,
                                                                                                   device=d)),
         None, why="multi_margin_loss has no ignore_index"),
    Edge("empty-batch", _gap(input=lambda d: torch.randn(0, 5, device=d),
                             target=lambda d: torch.zeros(0, dtype=torch.long, device=d)), None,
         why="torch 2.14's multi_margin_loss returns uninitialized memory for an empty batch (mean and sum)"),
    Edge("one-class", _gap(input=lambda d: torch.randn(4, 1, device=d),
                           target=lambda d: torch.zeros(4, dtype=torch.long, device=d)), _gap_twin),
    Edge("one-row-1d", _gap(input=lambda d: torch.randn(7, device=d), target=lambda d: torch.tensor(3, device=d)),
         _gap_twin),
    Edge("transposed", _gap(input=lambda d: torch.randn(7, 5, device=d), target=lambda d: _targets(5, 7, d)),
         _gap_twin, view=_transpose("input")),
    Edge("expanded-rows", _gap(input=lambda d: torch.randn(1, 7, device=d), target=lambda d: _targets(5, 7, d)),
         _gap_twin, view=_expand_rows("input", 5)),
)


def _lce_twin(**kw):
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(**kw)
    # torch before 2.14: the head, then cross-entropy (what F.linear_cross_entropy computes)
    logits = F.linear(kw.pop("input"), kw.pop("linear_weight"), kw.pop("linear_bias", None))
    return F.cross_entropy(logits, kw.pop("target"), **kw)


def _lce(n=5, d=4, v=7, **fixed):
    args = dict(input=lambda dev: torch.randn(n, d, device=dev),
                linear_weight=lambda dev: torch.randn(v, d, device=dev), target=lambda dev: _targets(n, v, dev))
    return _as(**{**args, **fixed})


def _nan_input(kw):
    x = kw["input"].clone()
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    return {**kw, "input": x}


LCE_EDGES = (
    Edge("nonfinite-input", _lce(), _lce_twin, view=_nan_input),
    Edge("all-ignored", _lce(target=lambda d: torch.full((5,), -100, device=d)), _lce_twin),
    Edge("empty-batch", _lce(n=0), _lce_twin),
    Edge("one-row-1d", _as(input=lambda d: torch.randn(4, device=d),
                           linear_weight=lambda d: torch.randn(7, 4, device=d),
                           target=lambda d: torch.tensor(6, device=d)), _lce_twin),
    Edge("one-class", _lce(v=1), _lce_twin),
    Edge("no-features", _lce(d=0), _lce_twin),
    Edge("expanded-input", _lce(n=1), _lce_twin, view=lambda kw: {**kw, "input": kw["input"].expand(5, 4),
                                                                 "target": _targets(5, 7, kw["input"].device)}),
    Edge("transposed-weight", _as(input=lambda d: torch.randn(5, 4, device=d),
                                  linear_weight=lambda d: torch.randn(4, 7, device=d),
                                  target=lambda d: _targets(5, 7, d), linear_bias=lambda d: torch.randn(7, device=d),
                                  label_smoothing=0.1), _lce_twin, view=_transpose("linear_weight")),
)


def _nce(n=5, m=5, d=4, dtype=torch.float32, **fixed):
    """temperature 1 unless given: a smooth softmax, so that no row's gradient is the small difference of
    large parts (test_info_nce.cancelling_parts derives the tolerance those need; its shapes cover them)."""
    args = dict(query=lambda dev: torch.randn(n, d, device=dev).to(dtype),
                key=lambda dev: torch.randn(m, d, device=dev).to(dtype), temperature=1.0)
    return _as(**{**args, **fixed})


def _poke(key, index, value):
    def view(kw):
        x = kw[key].clone()
        x[index] = value
        return {**kw, key: x}
    return view


NCE_EDGES = (
    Edge("nan-query", _nce(), view=_poke("query", (1, 2), float("nan"))),
    Edge("inf-key", _nce(), view=_poke("key", (3, 0), float("inf"))),
    Edge("inf-query-unnormalized", _nce(normalize=False, temperature=1.0), view=_poke("query", (2, 1), float("inf"))),
    Edge("zero-rows", _nce(labels=lambda d: torch.tensor([0, 1, 2, 3, 4], device=d)),
         view=lambda kw: {**kw, "query": kw["query"] * torch.tensor([[1.0], [0.0], [1.0], [1.0], [1.0]],
                                                                     device=kw["query"].device)}),
    Edge("symmetric", _nce(symmetric=True, temperature=0.5)),
    Edge("empty-batch", _nce(n=0)),
    Edge("empty-batch-and-keys", _nce(n=0, m=0)),
    Edge("one-feature", _nce(d=1, normalize=False)),
    Edge("expanded-query", _nce(n=1, labels=lambda d: torch.tensor([0, 1, 2, 3, 4], device=d)),
         view=lambda kw: {**kw, "query": kw["query"].expand(5, 4)}),
    Edge("transposed-key", _as(query=lambda d: torch.randn(5, 4, device=d), key=lambda d: torch.randn(4, 5, device=d),
                               temperature=1.0), view=_transpose("key")),
    # bf16 rows (raw rows and in-kernel normalization on triton, float32 copies elsewhere)
    Edge("bf16-nan-query", _nce(dtype=torch.bfloat16), view=_poke("query", (1, 2), float("nan"))),
    Edge("bf16-inf-key", _nce(dtype=torch.bfloat16), view=_poke("key", (3, 0), float("inf"))),
    Edge("bf16-zero-rows", _nce(dtype=torch.bfloat16, labels=lambda d: torch.tensor([0, 1, 2, 3, 4], device=d)),
         view=lambda kw: {**kw, "query": kw["query"] * torch.tensor([[1.0], [0.0], [1.0], [1.0], [1.0]],
                                                                     device=kw["query"].device).bfloat16()}),
    Edge("bf16-symmetric-unnormalized", _nce(dtype=torch.bfloat16, symmetric=True, normalize=False)),
    Edge("bf16-empty-batch", _nce(dtype=torch.bfloat16, n=0)),
    Edge("bf16-empty-batch-and-keys", _nce(dtype=torch.bfloat16, n=0, m=0)),
    Edge("bf16-expanded-query", _nce(dtype=torch.bfloat16, n=1, labels=lambda d: torch.tensor([0, 1, 2, 3, 4], device=d)),
         view=lambda kw: {**kw, "query": kw["query"].expand(5, 4)}),
    Edge("bf16-transposed-key", _as(query=lambda d: torch.randn(5, 4, device=d).bfloat16(),
                                    key=lambda d: torch.randn(4, 5, device=d).bfloat16(), temperature=1.0),
         view=_transpose("key")),
)


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable
    reference: Callable
    make: Callable[[int, torch.dtype, str], dict]  # (rows, dtype, device) -> keyword arguments of a valid call
    grads: tuple[str, ...]  # the floating arguments that get gradients
    bad: tuple[Bad, ...]
    # float64 keyword arguments for torch.autograd.gradcheck (the grads entries require grad)
    gradcheck_kwargs: Callable[[], dict]
    kernel_only: tuple[str, ...] = ()
    edges: tuple[Edge, ...] = ()

    def call(self, kwargs: dict, backend: str | None):
        return self.fn(**kwargs, backend=backend)

    def call_reference(self, kwargs: dict):
        return self.reference(**{k: v for k, v in kwargs.items() if k not in self.kernel_only})


# --- cross_entropy -----------------------------------------------------------------------------

CE_C = 5


def _ce_make(n, dtype, device):
    return dict(input=torch.randn(n, CE_C, device=device).to(dtype), target=torch.randint(0, CE_C, (n,), device=device))


CROSS_ENTROPY = Op(
    name="cross_entropy",
    fn=fusedloss.cross_entropy,
    reference=reference.cross_entropy,
    make=_ce_make,
    grads=("input",),
    bad=tuple(common_bad("input") + target_range_bad("target", CE_C) + smoothing_bad() + weight_bad(CE_C) + [
        Bad("input-0d", _with("input", lambda v, d: v[0, 0]), (ValueError,), ("input",)),
        Bad("input-no-classes", _with("input", lambda v, d: v[:, :0]), (ValueError,), ("input",)),
        Bad("input-other-device", _stray("input"), (RuntimeError,), ("input",)),
        Bad("target-batch-mismatch", _with("target", lambda v, d: v[:2]), (ValueError,), ("target",)),
        Bad("target-rank", _with("target", lambda v, d: v[:, None]), (ValueError,), ("target",)),
        Bad("target-complex", _with("target", lambda v, d: v.to(torch.complex64)), (TypeError,), ("target",)),
        Bad("target-bool", _with("target", lambda v, d: v.bool()), (TypeError,), ("target",)),
        Bad("target-not-a-tensor", _with("target", lambda v, d: v.tolist()), (TypeError,), ("target",)),
        Bad("target-other-device", _stray("target"), (RuntimeError,), ("target",)),
        Bad("target-probabilities-shape", _with("target", lambda v, d: torch.rand(3, CE_C - 1, device=d)),
            (ValueError,), ("target",)),
        Bad("temperature-zero", _set(temperature=0.0), (ValueError,), ("temperature",)),
        Bad("temperature-negative", _set(temperature=-1.0), (ValueError,), ("temperature",)),
        Bad("temperature-str", _set(temperature="1"), (TypeError,), ("temperature",)),
    ]),
    gradcheck_kwargs=lambda: dict(
        input=torch.randn(4, 6, dtype=torch.float64, requires_grad=True), target=torch.tensor([1, -100, 5, 0]),
        weight=torch.rand(6, dtype=torch.float64) + 0.5, label_smoothing=0.2, z_loss=0.01, softcap=2.0,
        temperature=0.6, reduction="mean"),
    edges=CE_EDGES,
)


# --- focal_loss ----------------------------------------------------------------------------------

FL_C = 5


def _fl_make(n, dtype, device):
    return dict(input=torch.randn(n, FL_C, device=device).to(dtype), target=torch.randint(0, FL_C, (n,), device=device),
                gamma=2.0)


FOCAL_LOSS = Op(
    name="focal_loss",
    fn=fusedloss.focal_loss,
    reference=reference.focal_loss,
    make=_fl_make,
    grads=("input",),
    bad=tuple(common_bad("input") + target_range_bad("target", FL_C) + weight_bad(FL_C) + [
        Bad("input-0d", _with("input", lambda v, d: v[0, 0]), (ValueError,), ("input",)),
        Bad("input-no-classes", _with("input", lambda v, d: v[:, :0]), (ValueError,), ("input",)),
        Bad("input-other-device", _stray("input"), (RuntimeError,), ("input",)),
        Bad("target-batch-mismatch", _with("target", lambda v, d: v[:2]), (ValueError,), ("target",)),
        Bad("target-rank", _with("target", lambda v, d: v[:, None]), (ValueError,), ("target",)),
        Bad("target-float", _with("target", lambda v, d: v.float()), (TypeError,), ("target",)),
        Bad("target-bool", _with("target", lambda v, d: v.bool()), (TypeError,), ("target",)),
        Bad("target-complex", _with("target", lambda v, d: v.to(torch.complex64)), (TypeError,), ("target",)),
        Bad("target-not-a-tensor", _with("target", lambda v, d: v.tolist()), (TypeError,), ("target",)),
        Bad("target-other-device", _stray("target"), (RuntimeError,), ("target",)),
        Bad("gamma-negative", _set(gamma=-0.5), (ValueError,), ("gamma",)),
        Bad("gamma-nan", _set(gamma=float("nan")), (ValueError,), ("gamma",)),
        Bad("gamma-inf", _set(gamma=float("inf")), (ValueError,), ("gamma",)),
        Bad("gamma-bool", _set(gamma=True), (TypeError,), ("gamma",)),
        Bad("gamma-str", _set(gamma="2"), (TypeError,), ("gamma",)),
        Bad("gamma-tensor", lambda kw, d: {**kw, "gamma": torch.tensor(2.0, device=d)}, (TypeError,), ("gamma",)),
        Bad("alpha-length", lambda kw, d: {**kw, "alpha": torch.rand(FL_C - 1, device=d)}, (ValueError,), ("alpha",)),
        Bad("alpha-2d", lambda kw, d: {**kw, "alpha": torch.rand(1, FL_C, device=d)}, (ValueError,), ("alpha",)),
        Bad("alpha-integer", lambda kw, d: {**kw, "alpha": torch.ones(FL_C, dtype=torch.long, device=d)}, (TypeError,),
            ("alpha",)),
        Bad("alpha-other-device", lambda kw, d: {**kw, "alpha": torch.rand(FL_C, device=other_device(d))},
            (RuntimeError,), ("alpha",)),
        Bad("alpha-negative", _set(alpha=-0.25), (ValueError,), ("alpha",)),
        Bad("alpha-nan", _set(alpha=float("nan")), (ValueError,), ("alpha",)),
        Bad("alpha-str", _set(alpha="balanced"), (TypeError,), ("alpha",)),
        Bad("ignore_index-float", _set(ignore_index=1.5), (TypeError,), ("ignore_index",)),
        Bad("ignore_index-str", _set(ignore_index="x"), (TypeError,), ("ignore_index",)),
    ]),
    gradcheck_kwargs=lambda: dict(
        input=torch.randn(4, 6, dtype=torch.float64, requires_grad=True), target=torch.tensor([1, -100, 5, 0]),
        gamma=1.5, alpha=torch.rand(6, dtype=torch.float64) + 0.1, weight=torch.rand(6, dtype=torch.float64) + 0.5,
        reduction="mean"),
    edges=FOCAL_EDGES,
)


# --- gap_loss ------------------------------------------------------------------------------------

GAP_C = 6


def _gap_make(n, dtype, device):
    return dict(input=torch.randn(n, GAP_C, device=device).to(dtype),
                target=torch.randint(0, GAP_C, (n,), device=device))


GAP_LOSS = Op(
    name="gap_loss",
    fn=fusedloss.gap_loss,
    reference=reference.gap_loss,
    make=_gap_make,
    grads=("input",),
    bad=tuple(common_bad("input") + target_range_bad("target", GAP_C) + weight_bad(GAP_C) + [
        Bad("input-0d", _with("input", lambda v, d: v[0, 0]), (ValueError,), ("input",)),
        Bad("input-3d", _with("input", lambda v, d: v[:, :, None]), (ValueError,), ("input",)),
        Bad("input-no-classes", _with("input", lambda v, d: v[:, :0]), (ValueError,), ("input",)),
        Bad("input-other-device", _stray("input"), (RuntimeError,), ("input",)),
        Bad("target-batch-mismatch", _with("target", lambda v, d: v[:2]), (ValueError,), ("target",)),
        Bad("target-float", _with("target", lambda v, d: v.float()), (TypeError,), ("target",)),
        Bad("target-complex", _with("target", lambda v, d: v.to(torch.complex64)), (TypeError,), ("target",)),
        Bad("target-other-device", _stray("target"), (RuntimeError,), ("target",)),
        Bad("p-3", _set(p=3), (ValueError,), ("p",)),
        Bad("p-bool", _set(p=True), (ValueError,), ("p",)),
        Bad("mode-unknown", _set(mode="mean"), (ValueError,), ("mode",)),
        Bad("margin-str", _set(margin="0.5"), (TypeError,), ("margin",)),
        Bad("ignore_index-float", _set(ignore_index=1.5), (TypeError,), ("ignore_index",)),
    ]),
    gradcheck_kwargs=lambda: dict(
        # spread out so that no gap sits within gradcheck's eps of the hinge
        input=(torch.randperm(24, dtype=torch.float64) * 0.37).reshape(4, 6).requires_grad_(),
        target=torch.tensor([1, -100, 5, 0]), margin=0.55, p=2, weight=torch.rand(6, dtype=torch.float64) + 0.5,
        reduction="mean"),
    edges=GAP_EDGES,
)


# --- linear_cross_entropy ------------------------------------------------------------------------

LCE_D, LCE_V = 4, 7


def _lce_make(n, dtype, device):
    return dict(input=torch.randn(n, LCE_D, device=device).to(dtype),
                linear_weight=torch.randn(LCE_V, LCE_D, device=device).to(dtype),
                target=torch.randint(0, LCE_V, (n,), device=device))


LINEAR_CROSS_ENTROPY = Op(
    name="linear_cross_entropy",
    fn=fusedloss.linear_cross_entropy,
    reference=reference.linear_cross_entropy,
    make=_lce_make,
    grads=("input", "linear_weight"),
    kernel_only=("chunk_size",),
    bad=tuple(common_bad("input") + target_range_bad("target", LCE_V) + smoothing_bad() + weight_bad(LCE_V) + [
        Bad("input-0d", _with("input", lambda v, d: v[0, 0]), (ValueError,), ("input",)),
        Bad("input-features", _with("input", lambda v, d: v[:, :-1]), (ValueError,), ("input", "linear_weight")),
        Bad("linear_weight-1d", _with("linear_weight", lambda v, d: v[0]), (ValueError,), ("linear_weight",)),
        Bad("linear_weight-3d", _with("linear_weight", lambda v, d: v[None]), (NotImplementedError,),
            ("linear_weight",)),
        Bad("linear_weight-no-classes", _with("linear_weight", lambda v, d: v[:0]), (ValueError,), ("linear_weight",)),
        Bad("linear_weight-dtype", _with("linear_weight", lambda v, d: v.double()), (TypeError,), ("linear_weight",)),
        Bad("linear_weight-integer", _with("linear_weight", lambda v, d: v.long()), (TypeError,), ("linear_weight",)),
        Bad("linear_weight-other-device", _stray("linear_weight"), (RuntimeError,), ("linear_weight",)),
        Bad("linear_bias-length", _set(linear_bias=torch.zeros(LCE_V - 1)), (ValueError,), ("linear_bias",)),
        Bad("linear_bias-other-device", lambda kw, d: {**kw, "linear_bias": torch.zeros(LCE_V, device=other_device(d))},
            (RuntimeError,), ("linear_bias",)),
        Bad("target-batch-mismatch", _with("target", lambda v, d: v[:2]), (ValueError,), ("target",)),
        Bad("target-float", _with("target", lambda v, d: v.float()), (NotImplementedError,), ("target",)),
        Bad("target-complex", _with("target", lambda v, d: v.to(torch.complex64)), (TypeError,), ("target",)),
        Bad("target-other-device", _stray("target"), (RuntimeError,), ("target",)),
        Bad("chunk_size-zero", _set(chunk_size=0), (ValueError,), ("chunk_size",)),
        Bad("chunk_size-float", _set(chunk_size=2.0), (ValueError,), ("chunk_size",)),
    ]),
    gradcheck_kwargs=lambda: dict(
        input=torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
        linear_weight=torch.randn(7, 4, dtype=torch.float64, requires_grad=True),
        linear_bias=torch.randn(7, dtype=torch.float64, requires_grad=True), target=torch.tensor([1, -100, 6, 0, 3]),
        weight=torch.rand(7, dtype=torch.float64) + 0.5, label_smoothing=0.2, z_loss=0.01, softcap=3.0,
        chunk_size=2,
        # none only: gradcheck runs two backwards through one graph, which mean and sum refuse by design
        # (their gradients are made in the forward; see test_linear_cross_entropy.test_gradcheck_float64)
        reduction="none"),
    edges=LCE_EDGES,
)


# --- info_nce ------------------------------------------------------------------------------------

NCE_M, NCE_D = 6, 8


def _nce_make(n, dtype, device):
    return dict(query=torch.randn(n, NCE_D, device=device).to(dtype),
                key=torch.randn(NCE_M, NCE_D, device=device).to(dtype),
                labels=torch.randint(0, NCE_M, (n,), device=device))


def _labels_range_bad() -> list[Bad]:
    def put(value):
        def change(kw, device):
            t = kw["labels"].clone()
            t[1] = value
            return {**kw, "labels": t, "reduction": "none"}
        return change
    cases = [Bad(f"labels-{label}", put(value), (IndexError,), ("labels",), nan_row=1)
             for label, value in (("equal-to-M", NCE_M), ("huge", 2**40), ("minus-1", -1), ("int64-min", -2**63))]
    # no keys at all: known from the shapes, so an IndexError on every device
    cases.append(Bad("labels-no-keys", _with("key", lambda v, d: v[:0]), (IndexError,), ("labels",)))
    return cases


INFO_NCE = Op(
    name="info_nce",
    fn=fusedloss.info_nce,
    reference=reference.info_nce,
    make=_nce_make,
    grads=("query", "key"),
    bad=tuple(common_bad("query") + _labels_range_bad() + [
        Bad("query-1d", _with("query", lambda v, d: v[0]), (ValueError,), ("query",)),
        Bad("key-3d", _with("key", lambda v, d: v[None]), (ValueError,), ("key",)),
        Bad("key-features", _with("key", lambda v, d: v[:, :-1]), (ValueError,), ("key",)),
        Bad("key-integer", _with("key", lambda v, d: v.long()), (TypeError,), ("key",)),
        Bad("key-dtype", _with("key", lambda v, d: v.double()), (TypeError,), ("key",)),
        Bad("key-other-device", _stray("key"), (RuntimeError,), ("key",)),
        Bad("labels-batch-mismatch", _with("labels", lambda v, d: v[:2]), (ValueError,), ("labels",)),
        Bad("labels-float", _with("labels", lambda v, d: v.float()), (TypeError,), ("labels",)),
        Bad("labels-other-device", _stray("labels"), (RuntimeError,), ("labels",)),
        Bad("labels-default-needs-keys", lambda kw, d: {**kw, "labels": None, "key": kw["key"][:2]}, (ValueError,),
            ("labels",)),
        Bad("symmetric-with-labels", _set(symmetric=True), (ValueError,), ("symmetric",)),
        Bad("temperature-zero", _set(temperature=0.0), (ValueError,), ("temperature",)),
        Bad("temperature-negative", _set(temperature=-0.5), (ValueError,), ("temperature",)),
        Bad("temperature-nan", _set(temperature=float("nan")), (ValueError,), ("temperature",)),
        Bad("temperature-str", _set(temperature="0.1"), (TypeError,), ("temperature",)),
        Bad("temperature-1d-tensor", lambda kw, d: {**kw, "temperature": torch.ones(1, device=d)}, (ValueError,),
            ("temperature",)),
        Bad("temperature-integer-tensor", lambda kw, d: {**kw, "temperature": torch.tensor(1, device=d)},
            (TypeError,), ("temperature",)),
        Bad("temperature-other-device", lambda kw, d: {**kw, "temperature": torch.tensor(0.1, device=other_device(d))},
            (RuntimeError,), ("temperature",)),
    ]),
    gradcheck_kwargs=lambda: dict(
        query=torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
        key=torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
        temperature=torch.tensor(0.7, dtype=torch.float64, requires_grad=True), symmetric=True, reduction="mean"),
    edges=NCE_EDGES,
)


OPS = {op.name: op for op in (CROSS_ENTROPY, GAP_LOSS, LINEAR_CROSS_ENTROPY, INFO_NCE, FOCAL_LOSS)}


def bad_case_params(devices=("cpu", "cuda")):
    """(op, backend, device, case id) for every bad case: every backend of each device, and the
    backend-independent cases once per device (under the reference backend, which every device has)."""
    out = []
    for device in devices:
        for op in OPS.values():
            for backend in BACKENDS_BY_DEVICE[device]:
                for case in op.bad:
                    if case.any_backend and backend != "reference":
                        continue
                    out.append((op.name, backend, device, case.id))
    return out


def case_of(op_name: str, case_id: str) -> Bad:
    return next(c for c in OPS[op_name].bad if c.id == case_id)
