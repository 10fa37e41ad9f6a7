"""Losses composed from a config: ``L = w1 L1 + w2 L2 + ...``, with a registry of losses by plain name.

A config is a mapping (or a YAML file holding one)::

    losses:
      - name: cross_entropy          # a registered loss (see ``known_losses()``)
        weight: 1.0                  # a real number; 1.0 when left out
        params: {label_smoothing: 0.1}
      - name: info_nce
        label: contrastive           # optional: the component's name (default: the loss name, made unique)
        weight: 0.5
        params: {temperature: 0.07, learnable_temperature: true}
        inputs: {query: q_emb, key: k_emb}

``build_loss`` turns it into a :class:`ComposedLoss`. The rules, in one place:

- **Inputs.** A loss's *inputs* are its required positional parameters that ``params`` does not set
  (``input, target`` for ``cross_entropy``; ``query, key`` for ``info_nce``; ``anchor, positive,
  negative`` for ``triplet``). The composed module is called as ``loss(input, target=None)``, where
  ``input`` is a tensor or a mapping of named tensors (the model's outputs); ``target``, when given,
  is one more entry named ``"target"``, and a tensor ``input`` is the entry named ``"input"``. Without
  ``inputs:``, a component of one or two inputs reads the entries ``"input"`` and ``"target"`` in that
  order; a loss of three or more inputs must say where they come from. ``inputs:`` is either a list
  of entry names, mapped in order onto the loss's positional parameters (``[q_emb, k_emb]`` gives
  ``query=q_emb, key=k_emb``; a third name would fill ``labels``), or a mapping from the loss's
  parameter names to entry names (``{query: q_emb, key: k_emb}``), which must name every input and may
  name optional tensor arguments too (``labels``, ``linear_bias``). A name missing from the outputs at
  call time raises ``KeyError`` naming the component, the argument and the entry.
- **Names.** Each component is named by its ``label`` if given, else by its loss name, with ``_1``,
  ``_2``, ... added for repeats (``cross_entropy``, ``cross_entropy_1``). ``last_values`` and
  ``weights`` are keyed by these names.
- **Parameters** are checked against the loss's signature when the loss is built (unknown ones raise
  ``TypeError`` naming the parameter and the loss). For a registered function they are its keyword
  arguments; for a registered ``nn.Module`` class, its constructor's. Tensor arguments that a YAML file
  can only spell as lists (``weight``, ``pos_weight``) become float32 tensors, kept as buffers of the
  component, so ``.to()`` moves them; so are tensors given directly in a Python config.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

__all__ = ["ComposedLoss", "build_loss", "hinge_loss", "known_losses", "register_loss"]

_COMPONENT_KEYS = ("name", "weight", "params", "inputs", "label")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def hinge_loss(input: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Binary hinge loss: per element ``max(0, margin - y * x)``, with ``y`` in ``{-1, +1}``.

    input: real scores of any shape; target: the same shape, ``-1`` or ``+1`` (any dtype). Targets in
    ``{0, 1}`` must be mapped first (``2 * y - 1``): a 0 would silently give the constant ``margin``.
    They are checked on CPU tensors; on other devices they are not (that would wait for the device).
    ``reduction``: ``"mean"`` (the default), ``"sum"`` or ``"none"``. The subgradient at the kink
    ``y * x == margin`` is 0 (``clamp``'s).
    """
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {type(input).__name__}"
                        f"{'' if not isinstance(input, Tensor) else ' of dtype ' + str(input.dtype)}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != input.shape:
        raise ValueError(f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ('none', 'mean', 'sum'), got {reduction!r}")
    if target.device.type == "cpu" and input.device.type == "cpu" and not bool((target.abs() == 1).all()):
        raise ValueError("hinge targets must be -1 or +1 (map 0/1 labels with 2 * y - 1)")
    per_element = torch.clamp_min(margin - target.to(input.dtype) * input, 0.0)
    if reduction == "none":
        return per_element
    return per_element.sum() if reduction == "sum" else per_element.mean()


# --------------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class _Entry:
    load: Callable[[], object]      # returns the loss function or nn.Module class (lazily, for focal_loss)
    origin: str                     # where it comes from, for error messages
    tensor_params: tuple[str, ...] = ()


def _lazy(module: str, attr: str) -> Callable[[], object]:
    def load():
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            raise RuntimeError(f"{module}.{attr} is registered but not available in this version of fusedloss")
        return getattr(mod, attr)
    return load


def _fixed(obj) -> Callable[[], object]:
    return lambda: obj


_TORCH = "torch.nn.functional"
_REGISTRY: dict[str, _Entry] = {
    # fusedloss's fused ops. info_nce is the module, so that a learnable temperature is a parameter of
    # the composed loss. focal_loss is looked up when a component is built (it may come later).
    "cross_entropy": _Entry(_lazy("fusedloss.functional", "cross_entropy"), "fusedloss.cross_entropy", ("weight",)),
    "gap_loss": _Entry(_lazy("fusedloss.functional", "gap_loss"), "fusedloss.gap_loss", ("weight",)),
    "info_nce": _Entry(_lazy("fusedloss.nn", "InfoNCELoss"), "fusedloss.nn.InfoNCELoss"),
    "siglip_loss": _Entry(_lazy("fusedloss.nn", "SigLIPLoss"), "fusedloss.nn.SigLIPLoss"),
    "linear_cross_entropy": _Entry(_lazy("fusedloss.functional", "linear_cross_entropy"),
                                   "fusedloss.linear_cross_entropy", ("weight",)),
    "focal_loss": _Entry(_lazy("fusedloss.functional", "focal_loss"), "fusedloss.focal_loss", ("weight", "alpha")),
    # distillation (inputs: {student: ..., teacher: ...}; the linear twins name their four inputs)
    "kl_div_logits": _Entry(_lazy("fusedloss.functional", "kl_div_logits"), "fusedloss.kl_div_logits"),
    "jsd_logits": _Entry(_lazy("fusedloss.functional", "jsd_logits"), "fusedloss.jsd_logits"),
    "linear_kl_div": _Entry(_lazy("fusedloss.functional", "linear_kl_div"), "fusedloss.linear_kl_div"),
    "linear_jsd": _Entry(_lazy("fusedloss.functional", "linear_jsd"), "fusedloss.linear_jsd"),
    # PyTorch's, unchanged.
    "nll": _Entry(_fixed(TF.nll_loss), f"{_TORCH}.nll_loss", ("weight",)),
    "bce": _Entry(_fixed(TF.binary_cross_entropy), f"{_TORCH}.binary_cross_entropy", ("weight",)),
    "bce_with_logits": _Entry(_fixed(TF.binary_cross_entropy_with_logits),
                              f"{_TORCH}.binary_cross_entropy_with_logits", ("weight", "pos_weight")),
    "mse": _Entry(_fixed(TF.mse_loss), f"{_TORCH}.mse_loss", ("weight",)),
    "mae": _Entry(_fixed(TF.l1_loss), f"{_TORCH}.l1_loss", ("weight",)),
    "l1": _Entry(_fixed(TF.l1_loss), f"{_TORCH}.l1_loss", ("weight",)),
    "huber": _Entry(_fixed(TF.huber_loss), f"{_TORCH}.huber_loss", ("weight",)),
    "smooth_l1": _Entry(_fixed(TF.smooth_l1_loss), f"{_TORCH}.smooth_l1_loss"),
    "kl_div": _Entry(_fixed(TF.kl_div), f"{_TORCH}.kl_div"),
    "hinge": _Entry(_fixed(hinge_loss), "fusedloss.compose.hinge_loss"),
    "triplet": _Entry(_fixed(TF.triplet_margin_loss), f"{_TORCH}.triplet_margin_loss"),
}


def known_losses() -> list[str]:
    """The names ``build_loss`` accepts, sorted."""
    return sorted(_REGISTRY)


def _is_module_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def register_loss(name: str, fn=None, *, overwrite: bool = False, tensor_params: Sequence[str] = ()):
    """Makes ``fn`` available to ``build_loss`` as ``name``.

    ``fn`` is either
    - a function ``fn(*inputs, **params) -> Tensor``: its required positional parameters are the
      component's inputs, its other parameters are what ``params:`` may set; or
    - an ``nn.Module`` subclass: each component builds its own instance as ``fn(**params)`` (so its
      parameters and buffers belong to the composed loss) and calls it with the inputs, which are the
      required positional parameters of its ``forward``.
    Module instances are refused (one instance would be shared by every component using the name).
    ``tensor_params`` names parameters whose list values (as YAML writes them) become float32 tensors.
    An existing name is refused unless ``overwrite=True``. Without ``fn``, returns a decorator.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a loss name must be a non-empty string without surrounding spaces, got {name!r}")
    if fn is None:
        return lambda f: register_loss(name, f, overwrite=overwrite, tensor_params=tensor_params)
    if isinstance(fn, nn.Module):
        raise TypeError(f"register_loss({name!r}, ...) got an nn.Module instance ({type(fn).__name__}); register its "
                        "class (each component makes its own instance from params) or a function")
    if not callable(fn):
        raise TypeError(f"register_loss({name!r}, ...) needs a function or an nn.Module class, got {type(fn).__name__}")
    _call_signature(fn, name)  # refuse now what could never be built
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a loss named {name!r} is already registered ({_REGISTRY[name].origin}); pass "
                         "overwrite=True to replace it")
    origin = getattr(fn, "__qualname__", repr(fn))
    _REGISTRY[name] = _Entry(_fixed(fn), f"{getattr(fn, '__module__', '?')}.{origin}", tuple(tensor_params))
    return fn


def _call_signature(target, loss_name: str) -> inspect.Signature:
    """The signature the inputs bind to: the function's, or the module class's forward (without self)."""
    what = target.forward if _is_module_class(target) else target
    try:
        sig = inspect.signature(what)
    except (TypeError, ValueError) as e:
        raise TypeError(f"loss {loss_name!r}: cannot read the signature of {what!r} ({e}); wrap it in a Python "
                        "function with named parameters") from None
    if _is_module_class(target):
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


# --------------------------------------------------------------------------------------------------
# Config checking

def _load_config(config) -> Mapping:
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading the loss config {path!r} needs PyYAML: pip install 'fusedloss[yaml]' "
                              "(or pyyaml), or pass the config as a dict") from None
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, Mapping):
            raise ValueError(f"the loss config {path!r} must hold a mapping with a 'losses' list, got "
                             f"{type(loaded).__name__}")
        return loaded
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (with a 'losses' list) or a path to a YAML file, got "
                        f"{type(config).__name__}")
    return config


def _check_weight(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: weight must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: weight must be finite, got {value}")
    return value


@dataclass
class _Spec:
    index: int
    name: str
    label: str | None
    weight: float
    params: dict
    inputs: list | dict | None

    @property
    def where(self) -> str:
        return f"losses[{self.index}] ({self.label or self.name})"


def _parse(config: Mapping) -> list[_Spec]:
    extra = sorted(set(config) - {"losses"})
    if extra:
        raise ValueError(f"unknown top-level key(s) {extra} in the loss config; it takes only 'losses'")
    if "losses" not in config:
        raise ValueError("the loss config needs a 'losses' key: a list of {name, weight, params, inputs} entries")
    losses = config["losses"]
    if isinstance(losses, (str, bytes, Mapping)) or not isinstance(losses, Sequence):
        raise TypeError(f"'losses' must be a list of components, got {type(losses).__name__}")
    if not losses:
        raise ValueError("'losses' is empty: give at least one component")
    specs = []
    for i, comp in enumerate(losses):
        if not isinstance(comp, Mapping):
            raise TypeError(f"losses[{i}] must be a mapping with 'name' (and 'weight', 'params', 'inputs'), got "
                            f"{comp!r}")
        unknown = sorted(set(comp) - set(_COMPONENT_KEYS))
        if unknown:
            raise ValueError(f"losses[{i}]: unknown key(s) {unknown}; a component takes {list(_COMPONENT_KEYS)}")
        if "name" not in comp:
            raise ValueError(f"losses[{i}] has no 'name' (one of: {', '.join(known_losses())})")
        name = comp["name"]
        if not isinstance(name, str):
            raise TypeError(f"losses[{i}]: name must be a string, got {name!r}")
        label = comp.get("label")
        if label is not None and (not isinstance(label, str) or not label or "." in label
                                  or hasattr(nn.ModuleDict(), label)):
            raise ValueError(f"losses[{i}] ({name}): label must be a non-empty string without '.' that is not an "
                             f"attribute of nn.ModuleDict, got {label!r}")
        where = f"losses[{i}] ({label or name})"
        weight = _check_weight(where, comp.get("weight", 1.0))
        params = comp.get("params")
        params = {} if params is None else params
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise TypeError(f"{where}: params must be a mapping of parameter names to values, got {params!r}")
        inputs = comp.get("inputs")
        if inputs is not None:
            if isinstance(inputs, Mapping):
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
                    raise TypeError(f"{where}: inputs must map argument names to output names (strings), "
                                    f"got {inputs!r}")
                inputs = dict(inputs)
            elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
                if not all(isinstance(v, str) for v in inputs):
                    raise TypeError(f"{where}: inputs must be a list of output names (strings), got {inputs!r}")
                inputs = list(inputs)
            else:
                raise TypeError(f"{where}: inputs must be a list of output names or a mapping "
                                f"{{argument: output name}}, got {inputs!r}")
        specs.append(_Spec(i, name, label, weight, dict(params), inputs))
    return specs


def _unique_names(specs: list[_Spec]) -> list[str]:
    labels = [s.label for s in specs if s.label is not None]
    for s in specs:
        if s.label is not None and labels.count(s.label) > 1:
            raise ValueError(f"{s.where}: label {s.label!r} is used by more than one component")
    taken = set(labels)
    names = []
    for s in specs:
        if s.label is not None:
            names.append(s.label)
            continue
        candidate, k = s.name, 0
        while candidate in taken:
            k += 1
            candidate = f"{s.name}_{k}"
        taken.add(candidate)
        names.append(candidate)
    return names


# --------------------------------------------------------------------------------------------------
# Components

class _FunctionLoss(nn.Module):
    """A registered function with its fixed parameters; tensor parameters are buffers (``.to()`` moves them)."""

    def __init__(self, fn: Callable, options: dict, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.options = options
        self._tensor_attrs = {}
        for pname, value in tensors.items():
            attr = pname if not hasattr(self, pname) else f"param_{pname}"
            self.register_buffer(attr, value)
            self._tensor_attrs[pname] = attr

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        for pname, attr in self._tensor_attrs.items():
            kwargs[pname] = getattr(self, attr)
        return self.fn(*args, **self.options, **kwargs)

    def extra_repr(self) -> str:
        fn = getattr(self.fn, "__qualname__", repr(self.fn))
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{fn}" + (f", {opts}" if opts else "")


@dataclass(frozen=True)
class _Route:
    """Where each argument of a component comes from: (argument, entry name, passed positionally)."""
    args: tuple[tuple[str, str, bool], ...]


def _tensorize(spec: _Spec, entry: _Entry, params: dict) -> tuple[dict, dict]:
    options, tensors = {}, {}
    for pname, value in params.items():
        if pname in entry.tensor_params and isinstance(value, (list, tuple)):
            try:
                value = torch.tensor(value, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{spec.where}: parameter {pname!r} must be a list of numbers, got {value!r} "
                                f"({e})") from None
        (tensors if isinstance(value, Tensor) else options)[pname] = value
    return options, tensors


def _check_params(spec: _Spec, entry: _Entry, sig: inspect.Signature, params: dict, kind: str) -> None:
    named = {p.name: p for p in sig.parameters.values() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                          inspect.Parameter.VAR_KEYWORD)}
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for pname in params:
        if pname not in named and not takes_any:
            hint = difflib.get_close_matches(pname, list(named), n=1)
            raise TypeError(f"{spec.where}: loss {spec.name!r} ({entry.origin}) got an unknown parameter {pname!r}"
                            + (f"; did you mean {hint[0]!r}?" if hint else ".")
                            + f" Its {kind} are: {', '.join(named) or '(none)'}")
        if pname in named and named[pname].kind == inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"{spec.where}: parameter {pname!r} of loss {spec.name!r} is positional-only; give it "
                            "through inputs")


def _route(spec: _Spec, entry: _Entry, call_sig: inspect.Signature, fixed: set[str]) -> _Route:
    """Maps the config's ``inputs`` (or the default ``input, target``) onto the loss's arguments."""
    params = [p for p in call_sig.parameters.values()
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in _POSITIONAL and p.name not in fixed]
    required = [p.name for p in positional if p.default is inspect.Parameter.empty]
    missing_kw = [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY
                  and p.default is inspect.Parameter.empty and p.name not in fixed]
    inputs = spec.inputs
    if inputs is None:
        if len(required) > 2:
            raise ValueError(f"{spec.where}: loss {spec.name!r} takes {len(required)} inputs ({', '.join(required)}); "
                             "say where they come from with inputs: (a list of output names, or a mapping "
                             "{argument: output name})")
        mapping = dict(zip(required, ("input", "target")))
    elif isinstance(inputs, list):
        if len(inputs) < len(required) or len(inputs) > len(positional):
            optional = ""
            if len(positional) > len(required):
                optional = (f" and at most {len(positional)} positional arguments "
                            f"({', '.join(p.name for p in positional)})")
            raise ValueError(f"{spec.where}: inputs {inputs} has {len(inputs)} names, but loss {spec.name!r} takes "
                             f"{len(required)} input(s) ({', '.join(required)}){optional}")
        mapping = {p.name: src for p, src in zip(positional, inputs)}
    else:
        known = {p.name for p in params}
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in call_sig.parameters.values())
        for arg in inputs:
            if arg in fixed:
                raise ValueError(f"{spec.where}: argument {arg!r} is given both in params and in inputs")
            if arg not in known and not takes_any:
                raise ValueError(f"{spec.where}: inputs names {arg!r}, which is not an argument of loss "
                                 f"{spec.name!r} ({entry.origin}); its arguments are: {', '.join(known)}")
        absent = [r for r in required if r not in inputs]
        if absent:
            raise ValueError(f"{spec.where}: inputs does not say where argument(s) {absent} of loss {spec.name!r} "
                             f"come from; it needs {', '.join(required)}")
        mapping = dict(inputs)
    if missing_kw:
        raise TypeError(f"{spec.where}: loss {spec.name!r} needs parameter(s) {missing_kw} in params")
    by_name = {p.name: p for p in params}
    route = []
    for arg, src in mapping.items():
        posonly = arg in by_name and by_name[arg].kind == inspect.Parameter.POSITIONAL_ONLY
        route.append((arg, src, posonly))
    # positional-only arguments go first, in the signature's order
    order = {p.name: i for i, p in enumerate(params)}
    route.sort(key=lambda r: (not r[2], order.get(r[0], len(order))))
    return _Route(tuple(route))


def _build_component(spec: _Spec, backend: str | None) -> tuple[nn.Module, _Route]:
    entry = _REGISTRY.get(spec.name)
    if entry is None:
        hint = difflib.get_close_matches(spec.name, list(_REGISTRY), n=1)
        raise ValueError(f"losses[{spec.index}]: unknown loss {spec.name!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f". Known losses: {', '.join(known_losses())}")
    target = entry.load()
    call_sig = _call_signature(target, spec.name)
    params = dict(spec.params)
    if _is_module_class(target):
        ctor_sig = inspect.signature(target)
        if backend is not None and "backend" in ctor_sig.parameters and "backend" not in params:
            params["backend"] = backend
        _check_params(spec, entry, ctor_sig, params, "constructor parameters")
        options, tensors = _tensorize(spec, entry, params)
        try:
            module = target(**options, **tensors)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{spec.where}: building {entry.origin}: {e}") from e
        route = _route(spec, entry, call_sig, fixed=set())
        return module, route
    if backend is not None and "backend" in call_sig.parameters and "backend" not in params:
        params["backend"] = backend
    _check_params(spec, entry, call_sig, params, "parameters")
    route = _route(spec, entry, call_sig, fixed=set(params))
    options, tensors = _tensorize(spec, entry, params)
    return _FunctionLoss(target, options, tensors), route


# --------------------------------------------------------------------------------------------------
# The composed loss

class _Weights(MutableMapping):
    """The components' weights by name: assignable between steps (``loss.weights["ce"] = 0.3``), checked."""

    def __init__(self, values: dict[str, float]) -> None:
        self._values = values

    def __getitem__(self, name: str) -> float:
        return self._values[name]

    def __setitem__(self, name: str, value) -> None:
        if name not in self._values:
            raise KeyError(f"no component named {name!r}; the components are: {', '.join(self._values)}")
        self._values[name] = _check_weight(f"component {name!r}", value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("a component's weight cannot be deleted; set it to 0.0 to switch the component off")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return repr(self._values)


class ComposedLoss(nn.Module):
    """The weighted sum of named loss components, built from a config (see the module docstring).

    ``forward(input, target=None)`` returns ``sum_i weights[name_i] * loss_i(...)``, where ``input`` is a
    tensor or a mapping of named tensors. After each call, ``last_values[name]`` holds each
    component's value, detached (a tensor: no host sync; ``.item()`` it when logging). ``weights`` can
    be changed between steps (``loss.weights["ce"] = 0.3``, ``loss.set_weight("ce", 0.3)`` or
    ``loss.weights.update(...)``); a weight of 0 keeps computing and logging the component but adds
    nothing. Weights are plain floats, not part of ``state_dict``. Components with parameters (a
    learnable InfoNCE temperature) or tensor options (class weights) are submodules in
    ``components``, so ``.parameters()`` and ``.to()`` see them.
    """

    def __init__(self, config, *, backend: str | None = None) -> None:
        super().__init__()
        specs = _parse(_load_config(config))
        names = _unique_names(specs)
        self.components = nn.ModuleDict()
        self._routes: dict[str, _Route] = {}
        weights = {}
        for spec, name in zip(specs, names):
            module, route = _build_component(spec, backend)
            self.components[name] = module
            self._routes[name] = route
            weights[name] = spec.weight
        self._weights = _Weights(weights)
        self._loss_names = {name: spec.name for spec, name in zip(specs, names)}
        self.last_values: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self.components.keys())

    @property
    def weights(self) -> _Weights:
        return self._weights

    @weights.setter
    def weights(self, values: Mapping) -> None:
        """Assigning a mapping sets the weights it names (the others keep theirs)."""
        for name, value in dict(values).items():
            self._weights[name] = value

    def set_weight(self, name: str, value: float) -> None:
        self._weights[name] = value

    def forward(self, input, target: Tensor | None = None) -> Tensor:
        if isinstance(input, Mapping):
            sources = dict(input)
            if target is not None:
                if "target" in sources:
                    raise ValueError("target is given twice: as an argument and as the outputs' 'target' entry")
                sources["target"] = target
        else:
            sources = {"input": input} if target is None else {"input": input, "target": target}
        total = None
        for name, module in self.components.items():
            args, kwargs = [], {}
            for arg, src, positional in self._routes[name].args:
                if src not in sources:
                    raise KeyError(f"component {name!r} ({self._loss_names[name]}) reads {src!r} for its argument "
                                   f"{arg!r}, but the inputs hold only {sorted(sources)}")
                if positional:
                    args.append(sources[src])
                else:
                    kwargs[arg] = sources[src]
            value = module(*args, **kwargs)
            if not isinstance(value, Tensor):
                raise TypeError(f"component {name!r} ({self._loss_names[name]}) returned {type(value).__name__}, not "
                                "a tensor (return_lse=True and the like cannot be summed)")
            self.last_values[name] = value.detach()
            term = self._weights[name] * value
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{n}: {w:g}" for n, w in self._weights.items())


def build_loss(config, *, backend: str | None = None) -> ComposedLoss:
    """A :class:`ComposedLoss` from ``config``: a mapping with a ``losses`` list, or a path to a YAML file.

    ``backend`` (optional) is passed to every component whose loss takes a ``backend`` argument and
    whose ``params`` do not set one (fusedloss's ops). Errors are raised here, not at the first call:
    ``ValueError`` for an unknown loss name (listing the known ones) or a malformed config,
    ``TypeError`` for an unknown parameter (naming it and the loss) or a value of the wrong type.
    """
    return ComposedLoss(config, backend=backend)
