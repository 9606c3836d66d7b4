r"""Hugging Face ``transformers``: trimmed training of a causal LM without materialising its logits.

One line patches a model instance::

    from fused_trim.integrations.transformers import apply_fused_trim
    apply_fused_trim(model, keep_ratio=0.5)            # or a fused_trim.schedules schedule

While the model trains and ``labels`` are given, its forward runs the backbone and then
:func:`fused_trim.trimmed_linear_cross_entropy` on the hidden states and the head's weight, inside
the head module's own call (so the head's hooks run as they would for ``lm_head(hidden)``), and
returns the model's output class with ``loss`` set and ``logits=None``. In eval, or without labels,
the original forward runs unchanged.

**Normalisation under gradient accumulation.** transformers passes ``num_items_in_batch``, the
number of valid label tokens over all micro-batches of one optimizer step (and all ranks with
``average_tokens_across_devices``). Without it the loss is the trimmed mean of the micro-batch.
With it, a micro-batch with ``n`` valid tokens and kept set ``K`` (``k = |K|``) returns

.. math:: \text{loss} = \operatorname{mean}_K(l) \cdot n / \text{num\_items\_in\_batch}
          = \textstyle\sum_K l \cdot (n / k) / \text{num\_items\_in\_batch},

so the micro-batches of one step sum to the token-weighted mean of their trimmed means, one
micro-batch gives the trimmed mean exactly, keep 1.0 gives transformers' own loss exactly, and a
micro-batch without valid tokens contributes 0.

**FSDP2 and global trimming.** The head's parameters are read inside the head module's call, where
FSDP2 has gathered them, with the head in the root's unit or its own (see :class:`_HeadCall`).
``process_group=`` (the data-parallel group) trims over the global batch: ``n`` and ``k`` above are
then those of all ranks' micro-batch, ``num_items_in_batch`` must count all ranks' tokens (the
Trainer's ``average_tokens_across_devices``), and each rank returns its share, which the Trainer
multiplies by the number of processes, as it does transformers' own loss.

Tested with transformers 5.25 (``pyproject.toml``'s ``hf`` extra states the range).
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import trimmed_cross_entropy, trimmed_linear_cross_entropy
from ..functional import _check_keep_rule
from ..schedules import KeepRatioSchedule

# A KeepRatioSchedule, or any callable (epoch, step) -> ratio, as the nn modules accept.
Schedule = KeepRatioSchedule | Callable[[int, int], float]

try:
    from transformers import TrainerCallback
    from transformers.utils import ModelOutput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fused_trim.integrations.transformers needs Hugging Face transformers: pip install 'fused_trim[hf]'"
    ) from exc

__all__ = [
    "apply_fused_trim",
    "remove_fused_trim",
    "get_trim_state",
    "TrimState",
    "TrimScheduleCallback",
    "trimmed_loss_func",
]

IGNORE_INDEX = -100
_STATE_ATTR = "_fused_trim_state"
_GROUPS = ("token", "sequence")
# Arguments the integration sets itself: a user value would be silently overridden or change the
# normalisation (class weights make the mean a weighted one, which num_items_in_batch does not count).
_RESERVED = ("reduction", "return_info", "score_offset", "weight", "ignore_index", "group_ids", "logit_softcap")
# Config attributes of models that transform the head's logits before the loss.
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap", "logit_softcapping")


def _op_accepts(op: Callable, name: str) -> bool:
    return name in inspect.signature(op).parameters


def _check_op_kwargs(op_kwargs: dict[str, Any]) -> None:
    for name in _RESERVED:
        if name in op_kwargs:
            raise ValueError(f"{name}= is set by the integration and cannot be passed, got {name}={op_kwargs[name]!r}")


def _shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels shifted as transformers' ``ForCausalLMLoss`` shifts them: position ``t`` predicts
    ``labels[..., t + 1]``, the last position gets ``ignore_index``."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def sequence_group_ids(shape: tuple[int, ...], position_ids: Tensor | None, device: torch.device) -> Tensor:
    """One group id per token of a ``(B, T)`` batch: its row, or with ``position_ids`` its document
    (a packed row starts a new document wherever ``position_ids`` is 0). Ids are ``0 .. M-1`` in
    order of appearance."""
    if len(shape) != 2:
        raise ValueError(f"group='sequence' needs (batch, seq) labels, got shape {tuple(shape)}")
    b, t = shape
    if position_ids is None:
        return torch.arange(b, device=device).repeat_interleave(t).reshape(b, t)
    pos = position_ids.to(device).expand(b, t)
    starts = pos == 0
    starts[:, 0] = True
    return (starts.reshape(-1).cumsum(0) - 1).reshape(b, t)


def _normalised(
    loss: Tensor,
    info: Any,
    target: Tensor,
    num_items_in_batch: Tensor | int | None,
    ignore_index: int,
    group: Any = None,
) -> Tensor:
    """The loss of one micro-batch: ``loss`` is the trimmed mean without ``num_items_in_batch``,
    else the kept sum, scaled by ``n / k`` and divided by ``num_items_in_batch`` (see the module).

    With a process ``group`` the micro-batch is that of all its ranks: ``n`` and ``k`` are global,
    and the op's kept sum, which it scales by the world size for gradient averaging, is this rank's
    share again, since the Trainer multiplies by the number of processes itself."""
    if num_items_in_batch is None:
        return loss
    n = (target != ignore_index).sum()
    # k counts tokens; with group_ids info.k counts groups, and the kept tokens are counted here.
    k = info.k if info.group_kept is None else info.kept.sum()
    if group is not None:
        import torch.distributed as dist

        counts = torch.stack([n, k.to(n.dtype)]) if info.group_kept is not None else n
        dist.all_reduce(counts, group=group)
        n, k = (counts[0], counts[1]) if info.group_kept is not None else (counts, k)
        loss = loss / dist.get_world_size(group)
    # n / k is 1 exactly at keep 1.0 and finite (0) for a micro-batch without valid tokens.
    scale = (n.to(torch.float64) / k.clamp_min(1).to(torch.float64)).to(loss.dtype)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss * scale / num_items_in_batch


class TrimState:
    """What a patched model (or :func:`trimmed_loss_func`) trims with, and what it last kept.

    One keep rule, as the op takes it: ``keep_ratio`` (a ratio or a schedule of ratios; 1.0 when no
    rule is given), ``keep_count`` (a count or a schedule of counts, e.g.
    ``OrderedSGDSchedule(start_count=64)``) or ``keep_threshold`` with ``min_kept`` (fixed). Set
    :attr:`keep_ratio` / :attr:`keep_count` directly, or call :meth:`set_progress` to evaluate the
    schedule. :meth:`pop_stats` returns (and resets) the kept fraction and last threshold since the
    previous call, synchronising with the device once.
    """

    def __init__(
        self,
        keep_ratio: float | Schedule | None = None,
        keep_count: int | Schedule | None = None,
        keep_threshold: float | None = None,
        min_kept: int | None = None,
    ) -> None:
        given = [n for n, v in (("keep_ratio", keep_ratio), ("keep_count", keep_count)) if v is not None]
        if keep_threshold is not None:
            given.append("keep_threshold")
        if len(given) > 1:
            raise ValueError(
                f"exactly one of keep_ratio, keep_count and keep_threshold sets k, got {' and '.join(given)}"
            )
        self.rule = given[0] if given else "keep_ratio"
        value = {"keep_ratio": keep_ratio, "keep_count": keep_count}.get(self.rule)
        self.schedule: Schedule | None = value if callable(value) else None
        self._keep_ratio: float | None = None
        self._keep_count: int | None = None
        if self.rule == "keep_threshold":
            _check_keep_rule(None, None, keep_threshold, min_kept)  # (names the bad argument)
        elif min_kept is not None:
            raise ValueError(f"min_kept is used with keep_threshold only, got min_kept={min_kept!r}")
        self.keep_threshold, self.min_kept = keep_threshold, min_kept
        if self.rule == "keep_ratio":
            self.keep_ratio = 1.0 if keep_ratio is None else (keep_ratio(0, 0) if self.schedule else keep_ratio)
        elif self.rule == "keep_count":
            self.keep_count = keep_count(0, 0) if self.schedule else keep_count
        self._kept: Tensor | None = None
        self._valid: Tensor | None = None
        self._threshold: Tensor | None = None

    @property
    def keep_ratio(self) -> float | None:
        """The ratio the next step keeps (``None`` under a count or threshold rule)."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        if self.rule != "keep_ratio":
            raise ValueError(f"keep_ratio cannot be set: this state keeps by {self.rule}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"keep_ratio must be a float in (0, 1] or a KeepRatioSchedule, got {value!r}")
        self._keep_ratio = float(value)

    @property
    def keep_count(self) -> int | None:
        """The count the next step keeps (``None`` under a ratio or threshold rule)."""
        return self._keep_count

    @keep_count.setter
    def keep_count(self, value: int) -> None:
        if self.rule != "keep_count":
            raise ValueError(f"keep_count cannot be set: this state keeps by {self.rule}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"keep_count must be an int >= 0 or a schedule of counts, got {value!r}")
        self._keep_count = value

    def rule_kwargs(self) -> dict[str, Any]:
        """The keep rule as the op's keyword arguments."""
        if self.rule == "keep_threshold":
            return {"keep_threshold": self.keep_threshold, "min_kept": self.min_kept}
        return {self.rule: getattr(self, self.rule)}

    def set_value(self, value: float | int) -> None:
        """Set the scheduled value (a ratio or a count, by the rule)."""
        if self.rule == "keep_threshold":
            raise ValueError("a keep_threshold rule has no schedule to step")
        setattr(self, self.rule, value)

    def set_progress(self, epoch: int, step: int = 0) -> float | int | None:
        """Evaluate the schedule at ``epoch`` / ``step`` (0-based, step within the epoch)."""
        if self.schedule is not None:
            self.set_value(self.schedule(epoch, step))
        return getattr(self, self.rule)

    def record(self, info: Any, target: Tensor, ignore_index: int) -> None:
        """Accumulate the kept and valid counts on the device (no host synchronisation)."""
        n = (target != ignore_index).sum()
        k = info.kept.sum()  # this rank's (info.k is global under a process_group)
        self._kept = k if self._kept is None else self._kept + k
        self._valid = n if self._valid is None else self._valid + n
        self._threshold = info.threshold.detach()

    def pop_stats(self) -> dict[str, float]:
        """The rule's value (``keep_ratio``, ``keep_count`` or ``keep_threshold``), ``kept_fraction``
        (kept over valid tokens since the last call) and ``trim_threshold`` (the last micro-batch's
        threshold loss)."""
        stats = {self.rule: getattr(self, self.rule)}
        if self._kept is not None:
            stats["kept_fraction"] = float(self._kept) / max(float(self._valid), 1.0)
            stats["trim_threshold"] = float(self._threshold)
        self._kept = self._valid = self._threshold = None
        return stats


class _PatchState(TrimState):
    def __init__(
        self,
        rule: dict[str, Any],
        keep: str,
        group: str,
        reference_model: nn.Module | None,
        backend: str,
        op_kwargs: dict[str, Any],
        prior_forward: Any,
    ) -> None:
        super().__init__(**rule)
        self.keep = keep
        self.group = group
        self.reference_model = reference_model
        self.backend = backend
        self.op_kwargs = op_kwargs
        self.prior_forward = prior_forward

    def __deepcopy__(self, memo: dict) -> _PatchState:
        # A process group cannot be copied: a copy of the model trims over the same ranks.
        group = self.op_kwargs.get("process_group")
        if group is not None:
            memo.setdefault(id(group), group)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def get_trim_state(model: nn.Module) -> TrimState:
    """The :class:`TrimState` of a model patched by :func:`apply_fused_trim`."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"model is not patched by apply_fused_trim: {type(model).__name__}")
    return state


def _linear_head(model: nn.Module, argname: str) -> nn.Linear:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"{argname} must be a causal LM with an output embedding (get_output_embeddings()), "
            f"got {type(model).__name__} without one"
        )
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{argname}'s output embedding must be an nn.Linear (its weight and bias are passed to the fused op), "
            f"got {type(head).__name__}; merge adapters on the head before patching"
        )
    return head


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for cfg in configs:
        for attr in _SOFTCAP_ATTRS:
            value = getattr(cfg, attr, None)
            if value:
                return float(value)
    return None


def _flat_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to the original forward's parameters)."""
    bound = signature.bind(*args, **kwargs)
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("the patched forward takes no extra positional arguments")
        else:
            flat[name] = value
    return flat


class _HeadCall:
    """Runs one fused loss in place of the head's ``F.linear`` for the duration of one forward.

    The head module is still *called* (its ``__call__``, hence its forward pre- and post-hooks,
    run as usual); only its ``forward`` is swapped for the duration, and the loss is computed from
    the head's own ``weight``/``bias`` read at that moment. It returns a placeholder of 0 positions,
    so whatever the model does to the logits afterwards costs nothing, and is detected.

    Under FSDP2 the head's own unit (``fully_shard(model.lm_head)``) gathers its parameters for
    the backward through a hook on the head's *outputs*, and frees them after the forward. The
    loss is not an output of the head, so the placeholder is made from the loss and added back to
    it, empty (:meth:`loss`): the loss's backward then waits for the placeholder's gradient, whose
    hook gathers the parameters first.
    """

    def __init__(self, head: nn.Linear, compute: Callable[[Tensor, nn.Linear], Any]) -> None:
        self.head = head
        self.compute = compute
        self.result: Any = None
        self.placeholder: Tensor | None = None
        self._calls = 0

    def _forward(self, hidden: Tensor) -> Tensor:
        self._calls += 1
        if self._calls > 1:
            raise RuntimeError("the output embedding was called more than once in one forward")
        self.result = self.compute(hidden, self.head)
        placeholder = hidden.new_zeros((*hidden.shape[:-2], 0, self.head.out_features))
        if self.result.requires_grad:
            placeholder = placeholder * self.result  # still empty; not a view (FSDP2 warns on those)
        self.placeholder = placeholder
        return placeholder

    def loss(self) -> Tensor:
        """The loss, exactly (plus an empty sum), its backward ordered after the head's output's."""
        if self.placeholder is None:
            raise RuntimeError("the patched model's forward never called its output embedding")
        if not self.result.requires_grad:
            return self.result
        return self.result + self.placeholder.sum()

    def __enter__(self) -> _HeadCall:
        self._prior = self.head.__dict__.get("forward")
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc: object) -> None:
        if self._prior is None:
            del self.head.forward
        else:
            self.head.forward = self._prior


def _original_output(outputs: Any, call: _HeadCall, softcaps: bool) -> Any:
    """The model's own output with ``loss`` set and ``logits=None``. A model that ``softcaps`` its
    logits (the op caps them itself) returns the capped placeholder: empty, of its shape."""
    loss = call.loss()

    def untransformed(logits: Any) -> bool:
        if logits is call.placeholder:
            return True
        return softcaps and isinstance(logits, Tensor) and logits.shape == call.placeholder.shape

    if isinstance(outputs, ModelOutput):
        if not untransformed(outputs.get("logits")):
            raise RuntimeError(
                f"{type(outputs).__name__}: the model transforms its head's logits before the loss (scaling, "
                "soft-capping or slicing them); fused_trim cannot reproduce that, remove the patch"
            )
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        return type(outputs)(loss=loss, logits=None, **fields)
    if not isinstance(outputs, tuple) or not outputs or not untransformed(outputs[0]):
        raise RuntimeError("the model transforms its head's logits before the loss; fused_trim cannot reproduce that")
    return (loss, None) + tuple(outputs[1:])


def _reference_losses(
    state: _PatchState, flat: dict[str, Any], target: Tensor, backend: str, op_kwargs: dict[str, Any]
) -> Tensor:
    """Per-token losses of the frozen reference model (keep 1.0, ``reduction="none"``, no grad)."""
    ref = state.reference_model
    head = _linear_head(ref, "reference_model")

    def compute(hidden: Tensor, module: nn.Linear) -> Tensor:
        return trimmed_linear_cross_entropy(
            hidden,
            module.weight,
            target.to(hidden.device),
            1.0,
            linear_bias=module.bias,
            reduction="none",
            backend=backend,
            logit_softcap=_softcap(ref),
            **{k: v for k, v in op_kwargs.items() if k in ("label_smoothing", "chunk_size")},
        )

    inputs = {k: v for k, v in flat.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    with torch.no_grad(), _HeadCall(head, compute) as call:
        ref(**inputs)
    if call.result is None:
        raise RuntimeError("reference_model's forward never called its output embedding")
    return call.result.detach()


def _patched_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _PatchState = model.__dict__[_STATE_ATTR]
    original = state.prior_forward if state.prior_forward is not None else type(model).forward.__get__(model)
    signature = inspect.signature(original)
    flat = _flat_kwargs(signature, args, kwargs)
    labels = flat.get("labels")
    if not model.training or labels is None:
        return original(*args, **kwargs)

    flat.pop("labels")
    shift_labels = flat.pop("shift_labels", None)
    num_items_in_batch = flat.pop("num_items_in_batch", None)
    logits_to_keep = flat.get("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError(f"logits_to_keep must be 0 when training with labels under fused_trim, got {logits_to_keep!r}")
    target = (shift_labels if shift_labels is not None else _shift_labels(labels)).contiguous()
    rule = state.rule_kwargs()
    op_kwargs = dict(state.op_kwargs)
    if state.group == "sequence":
        op_kwargs["group_ids"] = sequence_group_ids(target.shape, flat.get("position_ids"), target.device)
    if state.reference_model is not None:
        op_kwargs["score_offset"] = _reference_losses(state, flat, target, state.backend, state.op_kwargs)

    def compute(hidden: Tensor, head: nn.Linear) -> Tensor:
        t = target.to(hidden.device)
        loss, info = trimmed_linear_cross_entropy(
            hidden,
            head.weight,
            t,
            **rule,
            linear_bias=head.bias,
            keep=state.keep,
            ignore_index=IGNORE_INDEX,
            reduction="mean" if num_items_in_batch is None else "sum",
            backend=state.backend,
            return_info=True,
            **op_kwargs,
        )
        state.record(info, t, IGNORE_INDEX)
        return _normalised(loss, info, t, num_items_in_batch, IGNORE_INDEX, op_kwargs.get("process_group"))

    head = _linear_head(model, "model")
    with _HeadCall(head, compute) as call:
        outputs = original(**flat)
    return _original_output(outputs, call, "logit_softcap" in state.op_kwargs)


def apply_fused_trim(
    model: nn.Module,
    keep_ratio: float | Schedule | None = None,
    *,
    keep_count: int | Schedule | None = None,
    keep_threshold: float | None = None,
    min_kept: int | None = None,
    keep: str = "hardest",
    group: str = "token",
    reference_model: nn.Module | None = None,
    backend: str = "auto",
    **op_kwargs: Any,
) -> nn.Module:
    r"""Patch one causal-LM instance so that its training loss is the fused trimmed cross-entropy.

    The model (any ``*ForCausalLM`` whose head ``model.get_output_embeddings()`` is an
    ``nn.Linear``, tied or not) keeps its class; only this instance's ``forward`` changes. While
    ``model.training`` and ``labels`` are given, the backbone runs as usual and, in place of the
    head's ``F.linear``, :func:`~fused_trim.trimmed_linear_cross_entropy` computes the loss on the
    hidden states and the head's ``weight``/``bias`` with the labels shifted as transformers'
    ``ForCausalLMLoss`` shifts them (or ``shift_labels=`` as given), ignore index -100. It returns the
    model's output class with ``loss`` set and ``logits=None``. Otherwise the original forward runs.
    The loss is normalised for gradient accumulation as the module docstring states.

    Args:
        model: the causal LM to patch (in place).
        keep_ratio: a fixed ratio in ``(0, 1]`` or a :class:`~fused_trim.schedules.KeepRatioSchedule`
            (stepped by :class:`TrimScheduleCallback`, or :meth:`TrimState.set_progress`); ``None``
            (the default): 1.0 unless another keep rule is given.
        keep_count, keep_threshold, min_kept: the other keep rules (exactly one rule), as in
            :func:`~fused_trim.trimmed_linear_cross_entropy`: a fixed count of tokens (or sequences)
            or a schedule of counts (Ordered SGD), or a loss threshold with a minimum (OHEM).
        keep: ``"hardest"`` or ``"easiest"``.
        group: ``"token"`` ranks tokens; ``"sequence"`` ranks whole sequences (documents of a packed
            row where ``position_ids`` restart at 0), which needs the op's ``group_ids=`` option.
        reference_model: a causal LM with the same vocabulary; set to eval and frozen. Its per-token
            losses (keep 1.0, ``reduction="none"``, no grad) become ``score_offset``: tokens are
            ranked by their excess loss over the reference (Rho-1).
        backend: as in :func:`~fused_trim.trimmed_linear_cross_entropy`.
        **op_kwargs: further options of the op (``label_smoothing``, ``chunk_size``, ``z_loss``,
            ``process_group``: trim over the global batch of this data-parallel group, e.g. the
            FSDP2 mesh's; see the module docstring). A model that soft-caps its logits (Gemma 2's
            ``final_logit_softcapping``) passes its cap as ``logit_softcap``.

    Returns:
        ``model``, patched. :func:`remove_fused_trim` undoes it.

    Example::

        model = LlamaForCausalLM(config)
        apply_fused_trim(model, LinearSchedule(epochs=3, start=1.0, end=0.5))
        Trainer(model, args, train_dataset=ds, callbacks=[TrimScheduleCallback()]).train()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _STATE_ATTR in model.__dict__:
        raise ValueError("model is already patched by apply_fused_trim; call remove_fused_trim(model) first")
    head = _linear_head(model, "model")
    if keep not in ("hardest", "easiest"):
        raise ValueError(f"keep must be 'hardest' or 'easiest', got {keep!r}")
    if group not in _GROUPS:
        raise ValueError(f"group must be one of {', '.join(map(repr, _GROUPS))}, got {group!r}")
    if group == "sequence" and not _op_accepts(trimmed_linear_cross_entropy, "group_ids"):
        raise NotImplementedError(
            "group='sequence' needs the group_ids= option of trimmed_linear_cross_entropy, "
            "which this version of fused_trim does not have"
        )
    _check_op_kwargs(op_kwargs)
    op_kwargs = dict(op_kwargs)
    cap = _softcap(model)
    if cap is not None:
        op_kwargs["logit_softcap"] = float(cap)
    if reference_model is not None:
        ref_head = _linear_head(reference_model, "reference_model")
        if ref_head.out_features != head.out_features:
            raise ValueError(
                f"reference_model must have the model's vocabulary size {head.out_features}, "
                f"got {ref_head.out_features}"
            )
        reference_model.eval()
        reference_model.requires_grad_(False)

    prior = model.__dict__.get("forward")
    rule = dict(keep_ratio=keep_ratio, keep_count=keep_count, keep_threshold=keep_threshold, min_kept=min_kept)
    state = _PatchState(rule, keep, group, reference_model, backend, op_kwargs, prior)  # validates the rule

    # A method bound to this instance (not a closure over it), so that copy.deepcopy of the patched
    # model gives a patched copy; it carries the original's signature, which the Trainer inspects.
    @functools.wraps(prior.__func__ if isinstance(prior, types.MethodType) else type(model).forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _patched_forward(self, *args, **kwargs)

    model.__dict__[_STATE_ATTR] = state
    model.forward = types.MethodType(forward, model)
    return model


def remove_fused_trim(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fused_trim`: ``model.forward`` is again exactly what it was before."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"model is not patched by apply_fused_trim: {type(model).__name__}")
    del model.__dict__[_STATE_ATTR]
    if state.prior_forward is None:
        del model.__dict__["forward"]
    else:
        model.forward = state.prior_forward
    return model


class TrimmedCausalLMLoss:
    """A ``compute_loss_func`` for the Trainer that keeps the logits: the trimmed cross-entropy of
    the model's ``outputs.logits`` against the shifted labels, normalised as the module states.

    Built by :func:`trimmed_loss_func`; its :attr:`state` carries the keep rule.
    """

    def __init__(self, rule: dict[str, Any], keep: str, backend: str, op_kwargs: dict) -> None:
        if keep not in ("hardest", "easiest"):
            raise ValueError(f"keep must be 'hardest' or 'easiest', got {keep!r}")
        _check_op_kwargs(op_kwargs)
        self.state = TrimState(**rule)
        self.keep = keep
        self.backend = backend
        self.op_kwargs = op_kwargs

    def __call__(
        self, outputs: Any, labels: Tensor, num_items_in_batch: Tensor | int | None = None, **kwargs: Any
    ) -> Tensor:
        if labels is None:
            raise ValueError("labels must be given to the trimmed loss, got None")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        shift_labels = kwargs.get("shift_labels")
        target = (shift_labels if shift_labels is not None else _shift_labels(labels)).to(logits.device)
        flat = logits.float().reshape(-1, logits.shape[-1])
        t = target.reshape(-1)
        loss, info = trimmed_cross_entropy(
            flat,
            t,
            **self.state.rule_kwargs(),
            keep=self.keep,
            ignore_index=IGNORE_INDEX,
            reduction="mean" if num_items_in_batch is None else "sum",
            backend=self.backend,
            return_info=True,
            **self.op_kwargs,
        )
        self.state.record(info, t, IGNORE_INDEX)
        return _normalised(loss, info, t, num_items_in_batch, IGNORE_INDEX, self.op_kwargs.get("process_group"))


def trimmed_loss_func(
    keep_ratio: float | Schedule | None = None,
    *,
    keep_count: int | Schedule | None = None,
    keep_threshold: float | None = None,
    min_kept: int | None = None,
    keep: str = "hardest",
    backend: str = "auto",
    **op_kwargs: Any,
) -> TrimmedCausalLMLoss:
    """A ``Trainer(compute_loss_func=...)`` for models that keep their logits (no patch): called as
    ``(outputs, labels, num_items_in_batch)``, it shifts the labels as ``ForCausalLMLoss`` does and
    returns the trimmed loss, normalised as :func:`apply_fused_trim`'s. The logits are upcast to
    fp32 first, as transformers does. The keep rule as in :func:`apply_fused_trim`. Pass it to
    :class:`TrimScheduleCallback` to schedule it."""
    rule = dict(keep_ratio=keep_ratio, keep_count=keep_count, keep_threshold=keep_threshold, min_kept=min_kept)
    return TrimmedCausalLMLoss(rule, keep, backend, dict(op_kwargs))


class TrimScheduleCallback(TrainerCallback):
    """Steps a keep-ratio (or keep-count) schedule during ``Trainer.train()`` and logs what was kept.

    At each optimizer step the ratio (count) becomes ``schedule(epoch, step)`` (0-based epoch,
    0-based optimizer step within the epoch, counted by this callback), so epoch schedules change
    once per epoch and step schedules every step. Each training log gets the rule's value
    (``keep_ratio``, ``keep_count`` or ``keep_threshold``), ``kept_fraction`` (kept over valid
    tokens since the last log) and ``trim_threshold`` (the last threshold loss).

    Args:
        schedule: the schedule; ``None`` uses the one given to :func:`apply_fused_trim`.
        loss_func: a :func:`trimmed_loss_func` to drive instead of the patched model.
    """

    def __init__(self, schedule: Schedule | None = None, loss_func: TrimmedCausalLMLoss | None = None) -> None:
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"schedule must be a schedule (epoch, step) -> ratio or None, got {type(schedule).__name__}"
            )
        if loss_func is not None and not isinstance(loss_func, TrimmedCausalLMLoss):
            raise TypeError(f"loss_func must come from trimmed_loss_func, got {type(loss_func).__name__}")
        self.schedule = schedule
        self.loss_func = loss_func
        self.epoch = -1
        self.step = 0

    def _state(self, model: nn.Module | None) -> TrimState:
        if self.loss_func is not None:
            return self.loss_func.state
        if model is None:
            raise ValueError("TrimScheduleCallback got no model from the Trainer")
        return get_trim_state(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self.epoch += 1
        self.step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        trim = self._state(model)
        schedule = self.schedule if self.schedule is not None else trim.schedule
        if schedule is None:
            raise ValueError("TrimScheduleCallback has no schedule: pass one, or patch the model with one")
        trim.set_value(schedule(max(self.epoch, 0), self.step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.step += 1

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, model: nn.Module | None = None, **kwargs
    ):
        if logs is None or "loss" not in logs:
            return
        stats = self._state(model).pop_stats()
        logs.update(stats)
        # The Trainer appends a copy of the logs to its history before calling back.
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(stats)
