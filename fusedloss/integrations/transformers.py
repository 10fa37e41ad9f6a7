"""HuggingFace transformers: one model instance's causal-LM training loss from ``linear_cross_entropy``.

``apply(model)`` patches that instance (never its class, never ``torch.nn.functional``); ``revert(model)``
undoes it. Requires transformers 5.x (tested with 5.23.0); ``pip install 'fusedloss[hf]'``.

Why the head and not ``loss_function``: a ``*ForCausalLM.forward`` computes ``logits = lm_head(hidden)``
before it calls ``self.loss_function(logits, labels, ...)``, so by the time the loss function runs the
``(B, T, V)`` logits and their float32 upcast already exist. ``apply`` sets two instance attributes:

- ``model.forward``: with labels, grad enabled and ``model.training``, it arms the head and calls the
  family's own forward with ``labels=None`` (so HF's loss is skipped), then puts the head's loss, plus the
  router auxiliary loss where the family adds one, into the output. Otherwise it calls the family's
  forward unchanged: eval, ``no_grad``, ``generate()`` and ``Trainer.evaluate()`` see HF's behaviour.
- ``lm_head.forward``: when armed, it receives the final hidden states exactly as HF hands them to the
  head (already sliced by ``logits_to_keep``) and computes the loss from them and its own weight and bias.
  Running inside the head's own forward matters under FSDP: the module's pre-forward hook has gathered
  its weight (tested with FSDP2's ``fully_shard``, whose ``FSDPLinear`` head qualifies, and FSDP1). It
  returns an empty ``(..., 0)`` placeholder for the logits (or the real logits with ``return_logits=True``),
  so the family's post-processing (Gemma's softcap, Cohere's scale) stays cheap; the placeholder is
  computed from the loss and added back to it (a zero), so that the loss's gradient passes through the
  head's output, where FSDP's hook gathers the weight again for the head's backward. For a PEFT
  ``modules_to_save`` head, the linears inside the wrapper are patched instead (see :func:`apply`).

Everything else of the family's forward (its signature, caches, attention kwargs, router logits) is HF's.
The family's logit transform is applied inside the fused loss: ``final_logit_softcapping`` as
``softcap``, Cohere's ``logit_scale`` and Granite's ``1 / logits_scaling`` as a scale of the hidden states
(``(s h) W^T == s (h W^T)``). HF's loss semantics, from ``transformers/loss/loss_utils.py``: labels padded
with ``ignore_index`` and shifted by one (``shift=1`` here) unless ``shift_labels`` is given (used as is);
``ignore_index`` -100 unless passed; ``reduction="mean"``, or ``sum / num_items_in_batch`` when the
Trainer passes ``num_items_in_batch`` (gradient accumulation); the loss in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
import transformers
from torch import nn

import fusedloss

_MIN_VERSION = (5, 0)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


if _version_tuple(transformers.__version__) < _MIN_VERSION:  # pragma: no cover
    raise ImportError(f"fusedloss.integrations.transformers needs transformers>=5.0 (tested with 5.23.0), "
                      f"found {transformers.__version__}")


@dataclasses.dataclass(frozen=True)
class _Family:
    softcap: bool = False      # config.final_logit_softcapping: logits = c * tanh(logits / c)
    scale_attr: str | None = None   # model.<attr>: logits = logits * s
    divide_attr: str | None = None  # config.<attr>: logits = logits / s
    moe: bool = False          # loss += model.router_aux_loss_coef * aux_loss when router logits are output


# The families whose *ForCausalLM.forward was read and is tested (tests/test_integrations_transformers.py):
# each one runs lm_head once on the (logits_to_keep-sliced) final hidden states, applies the transform
# recorded here, calls self.loss_function(logits, labels, vocab_size, **kwargs) and, for MoE, adds the
# router auxiliary loss. A class not listed here raises instead of guessing.
FAMILIES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family(),
    "MistralForCausalLM": _Family(),
    "MixtralForCausalLM": _Family(moe=True),
    "Qwen2ForCausalLM": _Family(),
    "Qwen3ForCausalLM": _Family(),
    "Qwen3MoeForCausalLM": _Family(moe=True),
    "GemmaForCausalLM": _Family(),
    "Gemma2ForCausalLM": _Family(softcap=True),
    "Gemma3ForCausalLM": _Family(softcap=True),
    "Phi3ForCausalLM": _Family(),
    "Olmo2ForCausalLM": _Family(),
    "GPT2LMHeadModel": _Family(),
    "CohereForCausalLM": _Family(scale_attr="logit_scale"),
    "GraniteForCausalLM": _Family(divide_attr="logits_scaling"),
}

_ATTR = "_fusedloss_hf_patch"


class _Patch:
    """What apply() installed on one model, and the one-call state shared by its forwards."""

    def __init__(self, model, heads, family, backend, return_logits):
        self.model = model
        self.heads = heads  # the nn.Linear modules that may compute the logits (one, or a PEFT wrapper's)
        self.family = family
        self.backend = backend
        self.return_logits = return_logits
        self.model_forward_before = model.__dict__.get("forward")
        self.heads_forward_before = [head.__dict__.get("forward") for head in heads]
        self.original_forward = model.forward  # bound: the class's forward or whatever was there before
        self.param_names = [n for n, p in inspect.signature(self.original_forward).parameters.items()
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.armed = None   # (labels, shift_labels, num_items_in_batch, ignore_index) during a fused call
        self.loss = None


def _head_forward(patch: _Patch, head: nn.Linear, original_forward, x: torch.Tensor) -> torch.Tensor:
    armed = patch.armed
    if armed is None:
        return original_forward(x)
    patch.armed = None  # one head call per armed forward
    labels, shift_labels, num_items_in_batch, ignore_index = armed
    family, model = patch.family, patch.model
    h = x
    if family.scale_attr is not None:
        h = h * getattr(model, family.scale_attr)
    if family.divide_attr is not None:
        h = h / getattr(model.config, family.divide_attr)
    softcap = getattr(model.config, "final_logit_softcapping", None) if family.softcap else None
    rows = h.shape[:-1]
    if shift_labels is not None:
        target, shift = shift_labels, 0
        ok = target.numel() == rows.numel()
    else:
        target, shift = labels, 1
        # HF pads and shifts along the labels' last dim, then flattens against the logits' rows.
        ok = target.numel() == rows.numel() and target.dim() >= 1 and target.shape[-1] == rows[-1]
    if not ok:
        name = "shift_labels" if shift_labels is not None else "labels"
        raise ValueError(f"{name} has shape {tuple(target.shape)} but the hidden states given to the LM head "
                         f"have {tuple(rows)} positions (after logits_to_keep): they must match, as in HF's loss")
    target = target.to(h.device).reshape(rows)
    reduction = "mean" if num_items_in_batch is None else "sum"
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast does to the nn.Linear it replaces: operands in the autocast dtype (Trainer's bf16=True),
        # then the op runs outside autocast (it accumulates in fp32 and returns an fp32 loss itself).
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        loss = fusedloss.linear_cross_entropy(h, weight, target, linear_bias=bias, reduction=reduction,
                                              ignore_index=ignore_index, softcap=softcap, shift=shift,
                                              backend=patch.backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    patch.loss = loss
    if patch.return_logits:
        return original_forward(x)
    # The empty placeholder is computed from the loss (not a view: FSDP2 warns about views) and the model's
    # forward adds its (zero) sum back to the loss, so the loss's backward runs after the gradient of this
    # module's output. FSDP hooks that output to gather the weight again before the head's backward
    # (FSDP1 otherwise fails in backward when the head is its own unit; FSDP2 otherwise skips its unshard).
    return x.new_zeros((*rows, 0)) + loss.to(x.dtype)


def _model_forward(patch: _Patch, *args, **kwargs):
    if args:
        if len(args) > len(patch.param_names):
            raise TypeError(f"forward() takes {len(patch.param_names)} positional arguments, {len(args)} given")
        for name, value in zip(patch.param_names, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
    model = patch.model
    labels = kwargs.get("labels")
    if labels is None or not model.training or not torch.is_grad_enabled():
        return patch.original_forward(**kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    kwargs["labels"] = None
    # shift_labels and num_items_in_batch stay in kwargs: HF passes them on to the base model too.
    patch.armed = (labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                   kwargs.get("ignore_index", -100))
    patch.loss = None
    try:
        out = patch.original_forward(**kwargs, return_dict=True)
        loss = patch.loss
    finally:
        patch.armed = None
        patch.loss = None
    if loss is None:
        raise RuntimeError(f"fusedloss: {type(model).__name__}.forward did not call its LM head; "
                           "the fused loss could not be computed (a head module created after apply(), such as "
                           "the modules_to_save copy of a PEFT adapter added later, is not patched: revert and "
                           "apply again)")
    logits = getattr(out, "logits", None)
    if not patch.return_logits and torch.is_tensor(logits) and logits.numel() == 0:
        loss = loss + logits.sum().to(loss.dtype)  # exactly 0: ties the loss to the head's output (see above)
    aux = getattr(out, "aux_loss", None) if patch.family.moe else None
    if aux is not None:
        loss = loss + model.router_aux_loss_coef * aux.to(loss.device)
    # A new output object: ModelOutput keeps its dict and attributes in sync only for non-None values.
    fields = dict(out.items())
    fields["loss"] = loss
    if not patch.return_logits:
        fields.pop("logits", None)
    out = type(out)(**fields)
    return out if return_dict else out.to_tuple()


def _family_of(model) -> _Family:
    for cls in type(model).__mro__:
        family = FAMILIES.get(cls.__name__)
        if family is not None and cls.__module__.startswith("transformers."):
            if type(model).forward is not cls.forward:
                raise NotImplementedError(f"fusedloss: {type(model).__name__} overrides {cls.__name__}.forward; "
                                          "only the transformers forward of a supported family can be patched")
            return family
    supported = ", ".join(sorted(FAMILIES))
    raise NotImplementedError(f"fusedloss.integrations.transformers does not support {type(model).__name__}"
                              f" (model_type {getattr(getattr(model, 'config', None), 'model_type', '?')!r}); "
                              f"supported: {supported}")


def _is_peft(module) -> bool:
    return type(module).__module__.split(".")[0] == "peft"


def _unwrap(model):
    """The transformers model inside a PEFT model (``PeftModel*`` or its tuner, e.g. ``LoraModel``): PEFT's
    forwards call the inner model's forward, so patching that instance patches the PEFT model's training
    loss. Anything else is returned as is."""
    for _ in range(4):  # PeftModel -> LoraModel -> *ForCausalLM at most
        if not _is_peft(model):
            break
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _head_modules(model) -> list[nn.Linear]:
    """The ``nn.Linear`` modules that compute the logits: the output embedding, or for a PEFT
    ``ModulesToSaveWrapper`` head (``modules_to_save=["lm_head"]``) its frozen original and its trainable
    per-adapter copies. The wrapper calls exactly one of them, as its own forward decides (active adapter,
    adapters disabled), so each is patched and whichever runs computes the loss."""
    head = model.get_output_embeddings()
    leaves = [head]
    if _is_peft(head) and type(head).__name__ == "ModulesToSaveWrapper":
        leaves = [head.original_module, *head.modules_to_save.values()]
    # nn.Linear's own forward, F.linear(x, weight, bias), is what the fused loss replaces: a subclass that
    # keeps it (FSDP2's fully_shard makes one per module, FSDPLinear) qualifies, one that overrides it
    # (quantized linears) does not.
    if not all(isinstance(leaf, nn.Linear) and type(leaf).forward is nn.Linear.forward for leaf in leaves):
        kind = type(head).__name__ if len(leaves) == 1 else f"a {type(head).__name__} of " + ", ".join(
            sorted({type(leaf).__name__ for leaf in leaves}))
        raise NotImplementedError(f"fusedloss: the output embedding of {type(model).__name__} is {kind}, not a "
                                  "plain torch.nn.Linear (a LoRA-adapted or quantized head is not supported; a "
                                  "PEFT modules_to_save head is)")
    return leaves


def apply(model, *, backend: str | None = None, return_logits: bool = False):
    """Patch this ``*ForCausalLM`` instance: its training loss (labels given, grad enabled, ``model.training``)
    comes from :func:`fusedloss.linear_cross_entropy` on the final hidden states and the LM head's weight
    (tied or not) and bias, with HF's exact loss semantics, and ``logits`` is None unless
    ``return_logits=True``. Eval, ``no_grad`` and ``generate()`` run HF's forward unchanged. Returns
    ``model``. ``backend`` is passed to ``linear_cross_entropy`` (None: automatic).

    A PEFT model (``get_peft_model(...)``) may be passed as it is: the transformers model inside it is
    patched (the same as ``apply(peft_model.get_base_model())``). The head may be frozen (LoRA on the
    trunk: no weight gradient) or a ``ModulesToSaveWrapper`` (its active trainable copy gets the gradient);
    a LoRA adapter on the head itself is refused. Patch after the adapters are added: a head copy that a
    later ``add_adapter`` creates is not patched.

    There is no ``from_pretrained`` helper: ``apply(AutoModelForCausalLM.from_pretrained(...))`` is already
    one line, and ``apply`` returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers *ForCausalLM module, got {type(model).__name__}")
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {return_logits!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name or None, got {backend!r}")
    given, model = model, _unwrap(model)
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError(f"fusedloss: this {type(model).__name__} is already patched; call revert(model) first")
    family = _family_of(model)
    loss_type = getattr(model, "loss_type", None)
    if getattr(model, "_loss_function", None) is not None or loss_type not in (None, "ForCausalLM"):
        raise NotImplementedError(f"fusedloss: {type(model).__name__} has a custom loss function "
                                  f"(loss_type {loss_type!r}); only HF's causal-LM cross-entropy is replaced")
    heads = _head_modules(model)
    if family.softcap and not hasattr(model.config, "final_logit_softcapping"):
        raise NotImplementedError(f"fusedloss: {type(model.config).__name__} has no final_logit_softcapping")
    patch = _Patch(model, heads, family, backend, return_logits)
    model_fwd = functools.wraps(patch.original_forward)(functools.partial(_model_forward, patch))
    head_fwds = []
    for head in heads:
        original = head.forward
        head_fwds.append(functools.wraps(original)(functools.partial(_head_forward, patch, head, original)))
    patch.model_forward, patch.heads_forward = model_fwd, head_fwds
    # Plain instance attributes: nn.Module.__setattr__ keeps non-module, non-tensor values in __dict__,
    # where they shadow the class's forward for this instance only.
    object.__setattr__(model, "forward", model_fwd)
    for head, fwd in zip(heads, head_fwds):
        object.__setattr__(head, "forward", fwd)
    object.__setattr__(model, _ATTR, patch)
    return given


def revert(model):
    """Undo :func:`apply` on this model (or the PEFT model around it): its and its head's forwards are again
    what they were before. Returns ``model``."""
    given, model = model, _unwrap(model)
    patch = getattr(model, _ATTR, None)
    if patch is None:
        raise RuntimeError(f"fusedloss: this {type(model).__name__} is not patched (apply() was not called "
                           "or it was reverted)")
    if model.__dict__.get("forward") is not patch.model_forward:
        raise RuntimeError("fusedloss: model.forward was replaced after apply(); revert that first")
    restore = [(model, patch.model_forward_before), *zip(patch.heads, patch.heads_forward_before)]
    for module, before in restore:
        if before is None:
            del module.__dict__["forward"]
        else:
            object.__setattr__(module, "forward", before)
    del model.__dict__[_ATTR]
    return given


def is_applied(model) -> bool:
    """Whether :func:`apply` patched this model (or the one inside this PEFT model) and it was not reverted."""
    return getattr(_unwrap(model), _ATTR, None) is not None


@contextlib.contextmanager
def applied(model, *, backend: str | None = None, return_logits: bool = False):
    """``with applied(model): ...`` patches the model for the block and reverts it after."""
    apply(model, backend=backend, return_logits=return_logits)
    try:
        yield model
    finally:
        revert(model)


__all__ = ["FAMILIES", "applied", "apply", "is_applied", "revert"]
