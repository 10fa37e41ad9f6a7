"""fusedloss.build_loss: configs against the hand-written weighted sum, the registry, the errors, the README."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close

import fusedloss
from fusedloss import compose

yaml = pytest.importorskip("yaml")

BACKENDS = ["cpu", "reference"]
HAS_FOCAL = hasattr(fusedloss.functional, "focal_loss")
FOCAL_MISSING = ("fusedloss.functional.focal_loss is not in this branch yet (it comes with the focal-loss part of "
                 "issue #9); the registry resolves it lazily and these tests run once it is merged")

CE_GAP = {"losses": [
    {"name": "cross_entropy", "weight": 1.0, "params": {"label_smoothing": 0.1}},
    {"name": "gap_loss", "weight": 0.5, "params": {"margin": 0.5}},
]}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that the tests' registrations do not leak."""
    monkeypatch.setattr(compose, "_REGISTRY", dict(compose._REGISTRY))
    return compose._REGISTRY


def logits_and_target(N=6, C=7, dtype=torch.float32):
    x = torch.randn(N, C, dtype=dtype)
    t = torch.randint(0, C, (N,))
    return x, t


def loss_and_grad(fn, *inputs):
    leaves = [i.detach().clone().requires_grad_() for i in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss, grads


def hand_ce_gap(x, t, backend, w_ce=1.0, w_gap=0.5):
    return (w_ce * fusedloss.cross_entropy(x, t, label_smoothing=0.1, backend=backend)
            + w_gap * fusedloss.gap_loss(x, t, margin=0.5, backend=backend))


def assert_same(actual, expected):
    """The composed loss runs the very ops of the hand-written sum, in the same order: equal bits."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Dict and YAML configs against the hand-written sum

def write_yaml(tmp_path, config, name="loss.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["dict", "yaml-str", "yaml-path"])
def test_config_equals_weighted_sum(backend, source, tmp_path):
    config = {"dict": lambda: CE_GAP, "yaml-str": lambda: str(write_yaml(tmp_path, CE_GAP)),
              "yaml-path": lambda: write_yaml(tmp_path, CE_GAP)}[source]()
    criterion = fusedloss.build_loss(config, backend=backend)
    x, t = logits_and_target()
    loss, (grad,) = loss_and_grad(lambda x: criterion(x, t), x)
    expected, (expected_grad,) = loss_and_grad(lambda x: hand_ce_gap(x, t, backend), x)
    assert_same(loss, expected)
    assert_same(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_composition_against_float64_reference(dtype):
    criterion = fusedloss.build_loss(CE_GAP, backend="cpu")
    x, t = logits_and_target(N=9, C=33, dtype=dtype)
    loss, (grad,) = loss_and_grad(lambda x: criterion(x, t), x)
    expected, (expected_grad,) = loss_and_grad(lambda x: hand_ce_gap(x, t, "reference"), x.double())
    assert_close(loss, expected, dtype, "loss")
    # The gradient is g_ce + 0.5 g_gap, each rounded to the input dtype by its op, then their sum
    # rounded once more by autograd's accumulation. Each part is within TOL's rtol of its own exact
    # value, so the sum is within rtol (|g_ce| + 0.5 |g_gap|) + rtol |sum| (the last rounding, with the
    # same 2x margin) plus atol: where the parts cancel this exceeds rtol |sum|, the one-op bound.
    _, (g_ce,) = loss_and_grad(lambda x: fusedloss.cross_entropy(x, t, label_smoothing=0.1, backend="reference"),
                               x.double())
    _, (g_gap,) = loss_and_grad(lambda x: fusedloss.gap_loss(x, t, margin=0.5, backend="reference"), x.double())
    rtol, atol = TOL[dtype]["grad"]
    bound = rtol * (g_ce.abs() + 0.5 * g_gap.abs() + expected_grad.abs()) + atol * expected_grad.abs().max()
    error = (grad.double() - expected_grad).abs()
    assert (error <= bound).all(), f"[{dtype}] gradient error {(error - bound).max().item():.3g} over the bound"


def test_last_values_are_detached_per_component_and_refreshed():
    criterion = fusedloss.build_loss(CE_GAP, backend="cpu")
    assert criterion.last_values == {}
    for _ in range(2):
        x, t = logits_and_target()
        x.requires_grad_()
        criterion(x, t)
        assert list(criterion.last_values) == ["cross_entropy", "gap_loss"]
        assert_same(criterion.last_values["cross_entropy"],
                    fusedloss.cross_entropy(x, t, label_smoothing=0.1, backend="cpu").detach())
        assert_same(criterion.last_values["gap_loss"], fusedloss.gap_loss(x, t, margin=0.5, backend="cpu").detach())
        assert all(not v.requires_grad for v in criterion.last_values.values())


def test_weight_defaults_to_one_and_params_to_none():
    criterion = fusedloss.build_loss({"losses": [{"name": "cross_entropy"}]}, backend="cpu")
    assert dict(criterion.weights) == {"cross_entropy": 1.0}
    x, t = logits_and_target()
    assert_same(criterion(x, t), fusedloss.cross_entropy(x, t, backend="cpu"))


# --------------------------------------------------------------------------------------------------
# Names and weights

def test_duplicate_losses_get_unique_names():
    config = {"losses": [{"name": "cross_entropy", "weight": 1.0},
                         {"name": "cross_entropy", "weight": 0.25, "params": {"label_smoothing": 0.2}},
                         {"name": "cross_entropy", "weight": 0.5, "params": {"z_loss": 1e-2}}]}
    criterion = fusedloss.build_loss(config, backend="cpu")
    assert criterion.names == ["cross_entropy", "cross_entropy_1", "cross_entropy_2"]
    x, t = logits_and_target()
    loss = criterion(x, t)
    parts = [fusedloss.cross_entropy(x, t, backend="cpu"),
             fusedloss.cross_entropy(x, t, label_smoothing=0.2, backend="cpu"),
             fusedloss.cross_entropy(x, t, z_loss=1e-2, backend="cpu")]
    assert_same(loss, 1.0 * parts[0] + 0.25 * parts[1] + 0.5 * parts[2])
    for name, part in zip(criterion.names, parts):
        assert_same(criterion.last_values[name], part)


def test_labels_name_components_and_auto_names_avoid_them():
    config = {"losses": [{"name": "cross_entropy"},
                         {"name": "cross_entropy", "label": "cross_entropy_1"},
                         {"name": "cross_entropy", "label": "smooth", "params": {"label_smoothing": 0.1}},
                         {"name": "cross_entropy"}]}
    criterion = fusedloss.build_loss(config)
    assert criterion.names == ["cross_entropy", "cross_entropy_1", "smooth", "cross_entropy_2"]


@pytest.mark.parametrize("label, message", [("a", "used by more than one"), ("", "non-empty"), ("a.b", "without '.'"),
                                            ("keys", "attribute of nn.ModuleDict"), (3, "non-empty string")])
def test_bad_labels_rejected(label, message):
    config = {"losses": [{"name": "cross_entropy", "label": label}, {"name": "gap_loss", "label": "a"}]}
    with pytest.raises(ValueError, match=re.escape(message)):
        fusedloss.build_loss(config)


def test_weights_change_between_steps():
    criterion = fusedloss.build_loss(CE_GAP, backend="cpu")
    x, t = logits_and_target()
    assert_same(criterion(x, t), hand_ce_gap(x, t, "cpu", 1.0, 0.5))
    criterion.weights["gap_loss"] = 0.3
    assert_same(criterion(x, t), hand_ce_gap(x, t, "cpu", 1.0, 0.3))
    criterion.set_weight("cross_entropy", 2)
    assert_same(criterion(x, t), hand_ce_gap(x, t, "cpu", 2.0, 0.3))
    criterion.weights = {"gap_loss": 0.0}  # updates the named ones only
    assert dict(criterion.weights) == {"cross_entropy": 2.0, "gap_loss": 0.0}
    loss = criterion(x, t)
    assert_same(loss, hand_ce_gap(x, t, "cpu", 2.0, 0.0))
    assert criterion.last_values["gap_loss"] > 0  # a zero weight still logs the component


def test_bad_weight_updates_rejected():
    criterion = fusedloss.build_loss(CE_GAP)
    with pytest.raises(KeyError, match="no component named 'gap'.*cross_entropy, gap_loss"):
        criterion.weights["gap"] = 0.1
    with pytest.raises(TypeError, match="weight must be a real number"):
        criterion.weights["gap_loss"] = "0.1"
    with pytest.raises(TypeError, match="weight must be a real number"):
        criterion.set_weight("gap_loss", True)
    with pytest.raises(ValueError, match="finite"):
        criterion.weights["gap_loss"] = math.nan
    with pytest.raises(TypeError, match="cannot be deleted"):
        del criterion.weights["gap_loss"]
    assert dict(criterion.weights) == {"cross_entropy": 1.0, "gap_loss": 0.5}


def test_torch_compile_sees_weight_changes():
    criterion = fusedloss.build_loss(CE_GAP, backend="cpu")
    compiled = torch.compile(criterion, fullgraph=True)
    x, t = logits_and_target()
    assert_close(compiled(x, t), hand_ce_gap(x, t, "cpu", 1.0, 0.5), torch.float32, "loss")
    criterion.weights["gap_loss"] = 0.125
    assert_close(compiled(x, t), hand_ce_gap(x, t, "cpu", 1.0, 0.125), torch.float32, "loss")
    # inductor may reduce in another order than eager: the fp32 loss tolerance, not equal bits
    assert_close(criterion.last_values["gap_loss"], fusedloss.gap_loss(x, t, margin=0.5, backend="cpu"),
                 torch.float32, "loss")


# --------------------------------------------------------------------------------------------------
# Components on different inputs

MULTI = {"losses": [
    {"name": "cross_entropy", "weight": 1.0, "inputs": ["logits", "target"]},
    {"name": "info_nce", "weight": 0.5, "params": {"temperature": 0.1, "learnable_temperature": True},
     "inputs": {"query": "q", "key": "k"}},
    {"name": "info_nce", "weight": 0.25, "params": {"symmetric": True}, "inputs": ["k", "q"]},
]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_on_different_inputs(backend):
    criterion = fusedloss.build_loss(MULTI, backend=backend)
    (logit_scale,) = list(criterion.parameters())  # the learnable temperature is the loss's parameter
    assert logit_scale is criterion.components["info_nce"].logit_scale
    x, t = logits_and_target(N=5)
    q, k = torch.randn(5, 8), torch.randn(5, 8)

    def composed(x, q, k):
        return criterion({"logits": x, "q": q, "k": k, "target": t})

    def by_hand(x, q, k):
        temperature = torch.exp(-logit_scale.clamp(max=math.log(100.0)))
        return (fusedloss.cross_entropy(x, t, backend=backend)
                + 0.5 * fusedloss.info_nce(q, k, temperature=temperature, backend=backend)
                + 0.25 * fusedloss.info_nce(k, q, temperature=0.07, symmetric=True, backend=backend))

    loss, grads = loss_and_grad(composed, x, q, k)
    (scale_grad,) = torch.autograd.grad(composed(x, q, k), [logit_scale])
    expected, expected_grads = loss_and_grad(by_hand, x, q, k)
    (expected_scale_grad,) = torch.autograd.grad(by_hand(x, q, k), [logit_scale])
    assert_same(loss, expected)
    for g, e in zip(grads + (scale_grad,), expected_grads + (expected_scale_grad,)):
        assert_same(g, e)
    assert criterion.names == ["cross_entropy", "info_nce", "info_nce_1"]


def test_learnable_temperature_moves_with_to():
    criterion = fusedloss.build_loss(MULTI).to(torch.float64)
    assert [(n, p.dtype) for n, p in criterion.named_parameters()] == [("components.info_nce.logit_scale",
                                                                        torch.float64)]


def test_target_argument_joins_the_outputs():
    criterion = fusedloss.build_loss(MULTI, backend="cpu")
    x, t = logits_and_target(N=5)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    assert_same(criterion({"logits": x, "q": q, "k": k}, t), criterion({"logits": x, "q": q, "k": k, "target": t}))
    with pytest.raises(ValueError, match="target is given twice"):
        criterion({"logits": x, "q": q, "k": k, "target": t}, t)


def test_missing_output_names_component_and_key():
    criterion = fusedloss.build_loss(MULTI, backend="cpu")
    x, t = logits_and_target(N=5)
    with pytest.raises(KeyError, match=r"component 'info_nce' \(info_nce\) reads 'q' for its argument 'query'"):
        criterion({"logits": x, "k": torch.randn(5, 8)}, t)
    with pytest.raises(KeyError, match="reads 'logits'.*hold only \\['input', 'target'\\]"):
        criterion(x, t)


def test_optional_tensor_arguments_through_inputs():
    config = {"losses": [{"name": "info_nce", "inputs": {"query": "q", "key": "k", "labels": "pos"}},
                         {"name": "linear_cross_entropy",
                          "inputs": {"input": "h", "linear_weight": "W", "target": "target", "linear_bias": "b"}}]}
    criterion = fusedloss.build_loss(config, backend="cpu")
    q, k, pos = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    h, W, b, t = torch.randn(4, 8), torch.randn(11, 8), torch.randn(11), torch.randint(0, 11, (4,))
    loss = criterion({"q": q, "k": k, "pos": pos, "h": h, "W": W, "b": b}, t)
    expected = (fusedloss.info_nce(q, k, pos, backend="cpu")
                + fusedloss.linear_cross_entropy(h, W, t, linear_bias=b, backend="cpu"))
    assert_same(loss, expected)


def test_tensor_params_are_buffers_and_move_with_to():
    config = {"losses": [{"name": "cross_entropy", "params": {"weight": [1.0, 2.0, 0.5]}},
                         {"name": "bce_with_logits", "inputs": ["s", "y"], "params": {"pos_weight": [3.0]}}]}
    criterion = fusedloss.build_loss(config, backend="reference").double()
    buffers = dict(criterion.named_buffers())
    assert set(buffers) == {"components.cross_entropy.weight", "components.bce_with_logits.pos_weight"}
    assert all(b.dtype == torch.float64 for b in buffers.values())
    x, t = logits_and_target(N=4, C=3, dtype=torch.float64)
    s, y = torch.randn(4, 1, dtype=torch.float64), torch.randint(0, 2, (4, 1)).double()
    expected = (F.cross_entropy(x, t, weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
                + F.binary_cross_entropy_with_logits(s, y, pos_weight=torch.tensor([3.0], dtype=torch.float64)))
    assert_close(criterion({"input": x, "target": t, "s": s, "y": y}), expected, torch.float64, "loss")


# --------------------------------------------------------------------------------------------------
# Config errors

@pytest.mark.parametrize("config, exc, message", [
    ([{"name": "cross_entropy"}], TypeError, "config must be a dict"),
    ({"loss": [{"name": "cross_entropy"}]}, ValueError, "unknown top-level key(s) ['loss']"),
    ({}, ValueError, "needs a 'losses' key"),
    ({"losses": {"name": "cross_entropy"}}, TypeError, "'losses' must be a list of components, got dict"),
    ({"losses": "cross_entropy"}, TypeError, "'losses' must be a list of components, got str"),
    ({"losses": []}, ValueError, "'losses' is empty"),
    ({"losses": ["cross_entropy"]}, TypeError, "losses[0] must be a mapping"),
    ({"losses": [{"weight": 1.0}]}, ValueError, "losses[0] has no 'name' (one of: bce, bce_with_logits,"),
    ({"losses": [{"name": 3}]}, TypeError, "losses[0]: name must be a string"),
    ({"losses": [{"name": "gap_loss", "weight": "0.5"}]}, TypeError,
     "losses[0] (gap_loss): weight must be a real number, got '0.5' (str)"),
    ({"losses": [{"name": "gap_loss", "weight": None}]}, TypeError, "weight must be a real number, got None"),
    ({"losses": [{"name": "gap_loss", "weight": True}]}, TypeError, "weight must be a real number, got True"),
    ({"losses": [{"name": "gap_loss", "weight": float("inf")}]}, ValueError, "weight must be finite"),
    ({"losses": [{"name": "gap_loss", "param": {}}]}, ValueError, "losses[0]: unknown key(s) ['param']"),
    ({"losses": [{"name": "gap_loss", "params": [0.5]}]}, TypeError, "params must be a mapping"),
    ({"losses": [{"name": "gap_loss", "inputs": "logits"}]}, TypeError, "inputs must be a list of output names or"),
    ({"losses": [{"name": "gap_loss", "inputs": [1, 2]}]}, TypeError, "inputs must be a list of output names"),
])
def test_malformed_configs_rejected(config, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        fusedloss.build_loss(config)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ValueError) as info:
        fusedloss.build_loss({"losses": [{"name": "cross_entropy"}, {"name": "cross_entopy"}]})
    message = str(info.value)
    assert "losses[1]: unknown loss 'cross_entopy' (did you mean 'cross_entropy'?)" in message
    for name in compose.known_losses():
        assert name in message


@pytest.mark.parametrize("component, message", [
    ({"name": "cross_entropy", "params": {"label_smothing": 0.1}},
     "losses[0] (cross_entropy): loss 'cross_entropy' (fusedloss.cross_entropy) got an unknown parameter "
     "'label_smothing'; did you mean 'label_smoothing'?"),
    ({"name": "info_nce", "params": {"temprature": 0.1}},
     "loss 'info_nce' (fusedloss.nn.InfoNCELoss) got an unknown parameter 'temprature'; did you mean 'temperature'?"),
    ({"name": "hinge", "params": {"weight": [1.0]}},
     "loss 'hinge' (fusedloss.compose.hinge_loss) got an unknown parameter 'weight'. Its parameters are: input, "
     "target, margin, reduction"),
    ({"name": "mse", "label": "recon", "params": {"margin": 1.0}},
     "losses[0] (recon): loss 'mse' (torch.nn.functional.mse_loss) got an unknown parameter 'margin'"),
])
def test_unknown_params_rejected_at_build(component, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        fusedloss.build_loss({"losses": [component]})


@pytest.mark.parametrize("component, exc, message", [
    ({"name": "triplet"}, ValueError, "loss 'triplet' takes 3 inputs (anchor, positive, negative); say where"),
    ({"name": "linear_cross_entropy"}, ValueError, "takes 3 inputs (input, linear_weight, target)"),
    ({"name": "info_nce", "inputs": ["q"]}, ValueError, "inputs ['q'] has 1 names, but loss 'info_nce' takes 2"),
    ({"name": "info_nce", "inputs": ["q", "k", "l", "m"]}, ValueError, "at most 3 positional arguments"),
    ({"name": "info_nce", "inputs": {"query": "q"}}, ValueError, "does not say where argument(s) ['key']"),
    ({"name": "info_nce", "inputs": {"query": "q", "keys": "k"}}, ValueError,
     "inputs names 'keys', which is not an argument of loss 'info_nce'"),
    ({"name": "cross_entropy", "params": {"weight": [1.0]}, "inputs": {"input": "x", "target": "t", "weight": "w"}},
     ValueError, "argument 'weight' is given both in params and in inputs"),
    ({"name": "cross_entropy", "params": {"weight": ["a"]}}, TypeError, "parameter 'weight' must be a list of numbers"),
    ({"name": "info_nce", "params": {"temperature": -1.0}}, ValueError,
     "losses[0] (info_nce): building fusedloss.nn.InfoNCELoss: temperature must be a float > 0"),
])
def test_bad_inputs_rejected_at_build(component, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        fusedloss.build_loss({"losses": [component]})


def test_yaml_file_errors(tmp_path, monkeypatch):
    path = tmp_path / "list.yaml"
    path.write_text("- name: cross_entropy\n")
    with pytest.raises(ValueError, match="must hold a mapping with a 'losses' list, got list"):
        fusedloss.build_loss(path)
    with pytest.raises(FileNotFoundError):
        fusedloss.build_loss(tmp_path / "absent.yaml")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(ImportError, match=r"needs PyYAML: pip install 'fusedloss\[yaml\]'.*or pass the config as a "
                                          "dict"):
        fusedloss.build_loss(write_yaml(tmp_path, CE_GAP, "ok.yaml"))
    fusedloss.build_loss(CE_GAP)  # a dict needs no PyYAML


def test_non_tensor_result_rejected():
    criterion = fusedloss.build_loss({"losses": [{"name": "cross_entropy", "params": {"return_lse": True}}]})
    x, t = logits_and_target()
    with pytest.raises(TypeError, match="component 'cross_entropy' .* returned tuple, not a tensor"):
        criterion(x, t)


# --------------------------------------------------------------------------------------------------
# register_loss

def test_register_function(registry):
    def center(x, scale=1.0):
        return scale * x.mean(0).pow(2).sum()

    assert fusedloss.register_loss("center", center) is center
    config = {"losses": [{"name": "cross_entropy", "inputs": ["logits", "target"]},
                         {"name": "center", "weight": 0.1, "params": {"scale": 2.0}, "inputs": ["emb"]}]}
    criterion = fusedloss.build_loss(config, backend="cpu")
    x, t = logits_and_target()
    emb = torch.randn(6, 4)
    loss = criterion({"logits": x, "emb": emb}, t)
    assert_same(loss, fusedloss.cross_entropy(x, t, backend="cpu") + 0.1 * center(emb, scale=2.0))
    with pytest.raises(TypeError, match="loss 'center' .* got an unknown parameter 'scal'"):
        fusedloss.build_loss({"losses": [{"name": "center", "params": {"scal": 2.0}}]})
    # a one-input loss reads "input" by default
    assert_same(fusedloss.build_loss({"losses": [{"name": "center"}]})(emb), center(emb))


def test_register_module_class_and_decorator(registry):
    @fusedloss.register_loss("scaled_mse")
    class ScaledMSE(torch.nn.Module):
        def __init__(self, init_scale: float = 1.0):
            super().__init__()
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))

        def forward(self, prediction, target):
            return self.log_scale.exp() * F.mse_loss(prediction, target)

    criterion = fusedloss.build_loss({"losses": [{"name": "scaled_mse", "params": {"init_scale": 2.0}},
                                                 {"name": "scaled_mse", "weight": 0.5}]})
    assert [n for n, _ in criterion.named_parameters()] == ["components.scaled_mse.log_scale",
                                                            "components.scaled_mse_1.log_scale"]
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(criterion(a, b), 2.0 * F.mse_loss(a, b) + 0.5 * F.mse_loss(a, b))
    with pytest.raises(TypeError, match="loss 'scaled_mse' .* got an unknown parameter 'scale'; did you mean "
                                        "'init_scale'\\? Its constructor parameters are: init_scale"):
        fusedloss.build_loss({"losses": [{"name": "scaled_mse", "params": {"scale": 2.0}}]})


def test_register_refuses_overwrite_and_instances(registry):
    with pytest.raises(ValueError, match=r"'mse' is already registered \(torch.nn.functional.mse_loss\); pass "
                                         "overwrite=True"):
        fusedloss.register_loss("mse", lambda x, y: (x - y).abs().sum())
    fusedloss.register_loss("mse", lambda x, y: (x - y).abs().sum(), overwrite=True)
    a, b = torch.randn(3), torch.randn(3)
    assert_same(fusedloss.build_loss({"losses": [{"name": "mse"}]})(a, b), (a - b).abs().sum())
    with pytest.raises(TypeError, match="got an nn.Module instance .*register its class"):
        fusedloss.register_loss("ce_module", torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="needs a function or an nn.Module class"):
        fusedloss.register_loss("number", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        fusedloss.register_loss(" padded ", F.mse_loss)


def test_register_tensor_params(registry):
    fusedloss.register_loss("weighted_sq", lambda x, w=None: (w * x * x).sum(), tensor_params=["w"])
    criterion = fusedloss.build_loss({"losses": [{"name": "weighted_sq", "params": {"w": [1.0, 3.0]}}]})
    assert_same(criterion(torch.tensor([2.0, 1.0])), torch.tensor(7.0))


# --------------------------------------------------------------------------------------------------
# Every registry name: builds, runs, equals its function called directly

def classes(N=5, C=4):
    x, t = logits_and_target(N, C)
    return {"input": x, "target": t}


def binary(N=6):
    return {"input": torch.randn(N), "target": torch.randint(0, 2, (N,)).float()}


def regression(N=5, D=3):
    return {"input": torch.randn(N, D), "target": torch.randn(N, D)}


def focal_by_hand(x, t, gamma=2.0):
    logp = x.double().log_softmax(-1).gather(-1, t[:, None])[:, 0]
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def kl_by_hand(student, teacher, T=1.0):
    return F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                    reduction="batchmean") * T**2


def jsd_half_by_hand(student, teacher):
    """beta = 0.5: m = (p_t + p_s) / 2, loss = (KL(p_t || m) + KL(p_s || m)) / 2 per row, batchmean."""
    log_m = torch.logaddexp(F.log_softmax(teacher, -1), F.log_softmax(student, -1)) - math.log(2.0)
    kl = lambda logp: F.kl_div(log_m, logp, log_target=True, reduction="batchmean")  # noqa: E731
    return 0.5 * kl(F.log_softmax(teacher, -1)) + 0.5 * kl(F.log_softmax(student, -1))


def two_logits():
    return {"s": torch.randn(5, 6), "t": torch.randn(5, 6)}


def two_heads():
    return {"hs": torch.randn(5, 3), "Ws": torch.randn(6, 3), "ht": torch.randn(5, 4), "Wt": torch.randn(6, 4)}


# name -> (component, outputs, the expected value from the function called directly)
CASES = {
    "cross_entropy": ({"params": {"label_smoothing": 0.1}}, classes,
                      lambda o: F.cross_entropy(o["input"], o["target"], label_smoothing=0.1)),
    "gap_loss": ({"params": {"margin": 1.0, "class_normalize": True}}, classes,
                 lambda o: F.multi_margin_loss(o["input"], o["target"])),
    "info_nce": ({"params": {"temperature": 0.5}, "inputs": ["q", "k"]},
                 lambda: {"q": torch.randn(5, 3), "k": torch.randn(7, 3)},
                 lambda o: F.cross_entropy(F.normalize(o["q"]) @ F.normalize(o["k"]).T / 0.5, torch.arange(5))),
    "siglip_loss": ({"params": {"learnable": False}, "inputs": ["q", "k"]},
                    lambda: {"q": torch.randn(5, 3), "k": torch.randn(7, 3)},
                    lambda o: -F.logsigmoid((2 * torch.eye(5, 7) - 1)
                                            * (10 * F.normalize(o["q"]) @ F.normalize(o["k"]).T - 10)).sum() / 5),
    "linear_cross_entropy": ({"inputs": {"input": "h", "linear_weight": "W", "target": "target"}},
                             lambda: {"h": torch.randn(5, 3), "W": torch.randn(6, 3),
                                      "target": torch.randint(0, 6, (5,))},
                             lambda o: F.cross_entropy(o["h"] @ o["W"].T, o["target"])),
    "focal_loss": ({}, classes, lambda o: focal_by_hand(o["input"], o["target"])),
    "nll": ({"params": {"weight": [1.0, 0.5, 2.0, 1.0]}}, classes,
            lambda o: F.nll_loss(o["input"], o["target"], weight=torch.tensor([1.0, 0.5, 2.0, 1.0]))),
    "bce": ({}, lambda: {"input": torch.rand(6) * 0.9 + 0.05, "target": torch.randint(0, 2, (6,)).float()},
            lambda o: F.binary_cross_entropy(o["input"], o["target"])),
    "bce_with_logits": ({"params": {"pos_weight": [2.0]}}, binary,
                        lambda o: F.binary_cross_entropy_with_logits(o["input"], o["target"],
                                                                     pos_weight=torch.tensor([2.0]))),
    "mse": ({}, regression, lambda o: F.mse_loss(o["input"], o["target"])),
    "mae": ({}, regression, lambda o: F.l1_loss(o["input"], o["target"])),
    "l1": ({"params": {"reduction": "sum"}}, regression, lambda o: F.l1_loss(o["input"], o["target"], reduction="sum")),
    "huber": ({"params": {"delta": 0.5}}, regression, lambda o: F.huber_loss(o["input"], o["target"], delta=0.5)),
    "smooth_l1": ({"params": {"beta": 0.5}}, regression,
                  lambda o: F.smooth_l1_loss(o["input"], o["target"], beta=0.5)),
    "kl_div": ({"params": {"reduction": "batchmean"}},
               lambda: {"input": torch.randn(5, 4).log_softmax(-1), "target": torch.randn(5, 4).softmax(-1)},
               lambda o: F.kl_div(o["input"], o["target"], reduction="batchmean")),
    "hinge": ({"params": {"margin": 0.5}},
              lambda: {"input": torch.randn(8), "target": torch.randint(0, 2, (8,)) * 2.0 - 1},
              lambda o: torch.clamp(0.5 - o["target"] * o["input"], min=0).mean()),
    "kl_div_logits": ({"params": {"temperature": 2.0}, "inputs": ["s", "t"]}, two_logits,
                      lambda o: kl_by_hand(o["s"], o["t"], 2.0)),
    "jsd_logits": ({"inputs": ["s", "t"]}, two_logits, lambda o: jsd_half_by_hand(o["s"], o["t"])),
    "linear_kl_div": ({"inputs": ["hs", "Ws", "ht", "Wt"]}, two_heads,
                      lambda o: kl_by_hand(o["hs"] @ o["Ws"].T, o["ht"] @ o["Wt"].T)),
    "linear_jsd": ({"inputs": ["hs", "Ws", "ht", "Wt"]}, two_heads,
                   lambda o: jsd_half_by_hand(o["hs"] @ o["Ws"].T, o["ht"] @ o["Wt"].T)),
    "triplet": ({"params": {"margin": 0.3}, "inputs": ["a", "p", "n"]},
                lambda: {"a": torch.randn(5, 3), "p": torch.randn(5, 3), "n": torch.randn(5, 3)},
                lambda o: F.triplet_margin_loss(o["a"], o["p"], o["n"], margin=0.3)),
}


def test_every_registered_name_has_a_case():
    assert sorted(CASES) == compose.known_losses()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_registry_name_matches_its_function(name, backend):
    if name == "focal_loss" and not HAS_FOCAL:
        pytest.skip(FOCAL_MISSING)
    component, make_outputs, expected_fn = CASES[name]
    criterion = fusedloss.build_loss({"losses": [{"name": name, "weight": 0.75, **component}]}, backend=backend)
    outputs = make_outputs()
    for v in outputs.values():
        if v.is_floating_point():
            v.requires_grad_()
    loss = criterion(outputs)
    expected = expected_fn(outputs)
    # fusedloss's own ops return float32 like torch's but add in another order: the fp32 loss tolerance
    assert_close(criterion.last_values[name], expected.float(), torch.float32, "loss", msg=name)
    assert_close(loss, 0.75 * expected.float(), torch.float32, "loss", msg=name)
    leaves = [v for v in outputs.values() if v.requires_grad and v.is_leaf]
    grads = torch.autograd.grad(loss, leaves)
    expected_grads = torch.autograd.grad(0.75 * expected, leaves)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e.to(g.dtype), torch.float32, "grad", msg=name)


def test_hinge_rejects_zero_one_targets():
    with pytest.raises(ValueError, match=r"-1 or \+1 \(map 0/1 labels with 2 \* y - 1\)"):
        compose.hinge_loss(torch.randn(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="target must have the input's shape"):
        compose.hinge_loss(torch.randn(4), torch.ones(3))


@pytest.mark.skipif(HAS_FOCAL, reason="focal_loss is present: the lazy lookup finds it")
def test_focal_loss_missing_is_reported_at_build():
    with pytest.raises(RuntimeError, match="fusedloss.functional.focal_loss is registered but not available"):
        fusedloss.build_loss({"losses": [{"name": "focal_loss"}]})


@pytest.mark.skipif(not HAS_FOCAL, reason=FOCAL_MISSING)
@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_loss_component_equals_the_function(backend):
    config = {"losses": [{"name": "cross_entropy", "weight": 1.0},
                         {"name": "focal_loss", "weight": 0.5, "params": {"gamma": 1.5}}]}
    criterion = fusedloss.build_loss(config, backend=backend)
    x, t = logits_and_target()
    loss, (grad,) = loss_and_grad(lambda x: criterion(x, t), x)
    expected, (expected_grad,) = loss_and_grad(
        lambda x: fusedloss.cross_entropy(x, t, backend=backend)
        + 0.5 * fusedloss.functional.focal_loss(x, t, gamma=1.5, backend=backend), x)
    assert_same(loss, expected)
    assert_same(grad, expected_grad)
    assert fusedloss.focal_loss is fusedloss.functional.focal_loss


# --------------------------------------------------------------------------------------------------
# The README's example runs as written

def readme_example():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Combining losses\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Combining losses' section"
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section.group(1), re.S | re.M)
    yamls = [b for lang, b in blocks if lang == "yaml"]
    pythons = [b for lang, b in blocks if lang == "python"]
    assert len(yamls) == 1 and len(pythons) == 1, "the section should hold one yaml and one python block"
    return yamls[0], pythons[0]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    config, program = readme_example()
    file_name = re.search(r"build_loss\(\"([^\"]+\.yaml)\"\)", program)
    assert file_name, "the Python example should load the YAML example by its file name"
    (tmp_path / file_name.group(1)).write_text(config)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(program, "README.md (Combining losses)", "exec"), namespace)
    criterion = namespace["criterion"]
    assert isinstance(criterion, fusedloss.ComposedLoss)
    assert set(criterion.last_values) == set(criterion.names) and len(criterion.names) >= 2
    assert capsys.readouterr().out.strip()
