"""ESS-scaled learning rate (VCPO, arXiv 2602.17616, code mit-han-lab/vcpo).

For each optimizer step, with r = ESS/N the effective-sample-size ratio of the step's
sequence-level importance weights (see `stable_async.effective_sample_size`):

    s = sqrt(min(1, r / base_ratio))   rule="sqrt"   (default; the paper's rule for Adam-type optimizers)
    s = min(1, r / base_ratio)         rule="linear"
    s = max(s, min_scale)
    η_used = η_schedule · s            for every param group, for this one step only

`ESSScaledLR.step` multiplies each param group's ``lr`` by s, calls the wrapped optimizer's
``step``, then puts back the exact previous ``lr`` objects (also when the step raises). A
learning-rate scheduler therefore never sees the scaled value: LambdaLR / cosine / warmup,
and chainable schedulers that read ``group["lr"]``, behave as if the wrapper were absent. The
wrapper is a `torch.optim.Optimizer` (it forwards ``param_groups``, ``state`` and ``defaults``
to the wrapped optimizer), so a scheduler may be built on either the wrapper or the wrapped
optimizer, and every `torch.optim.Optimizer` hook registration works on it: step pre/post
hooks run around `ESSScaledLR.step`, state-dict and load-state-dict pre/post hooks around
`ESSScaledLR.state_dict` / `ESSScaledLR.load_state_dict` (hooks registered on the wrapped
optimizer run too, when the wrapper calls it). `ESSScaledLR.scaled_step` is the same step
without the wrapper's own step hooks (for a caller, such as `stable_async.StableStep`, that is
itself called from a hooked ``step``).

Missing ESS (``step()`` without ``ess_ratio`` and nothing staged with `set_ess_ratio`),
controlled by ``on_missing``:

* ``"base"`` (default): step at the unscaled schedule LR (s = 1) and warn once. This is the
  un-wrapped optimizer's behaviour: a forgotten argument never freezes training silently.
* ``"skip"``: do not call the wrapped optimizer at all (parameters and optimizer state unchanged).
* ``"zero"``: the reference code's behaviour: step with lr = 0 (Adam's moments and step count
  still advance, the parameters do not move; with decoupled weight decay ∝ lr, no decay either).
* ``"raise"``: raise a ValueError.

Defaults: rule="sqrt", base_ratio=1.0, min_scale=0.0 (as in the reference). No smoothing of r
(none in the reference).

Metrics (``last_metrics`` after each step): ``vcpo/lr_scale`` (s), ``vcpo/ess_ratio`` (r, absent
when missing), ``vcpo/ess_missing`` (0 or 1), ``vcpo/lr`` (the first group's LR used).

Differences from the reference code:

* Missing ESS: the reference substitutes r = 0, i.e. η = 0; we default to ``"base"`` (above)
  and offer the reference behaviour as ``on_missing="zero"``.
* A NaN or negative r raises here; in the reference an overflowing ESS (inf/inf = NaN) falls
  through ``min(1.0, nan) == 1.0`` to the full LR. r > 1 + 1e-6 raises too (ESS/N ≤ 1 by
  definition; a larger value usually means ESS was passed instead of ESS/N).
* The reference clamps base_ratio below at 1e-8; we require base_ratio > 0 and finite.
* ``min_scale`` (a floor on s) is an addition; its default 0 reproduces the reference.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from stable_async.diagnostics import ESSResult

RULES = ("sqrt", "linear")
ON_MISSING = ("base", "skip", "zero", "raise")
_STATE_KEY = "ess_scaled_lr"
_RATIO_TOLERANCE = 1e-6


def ess_lr_scale(ess_ratio: float, rule: str = "sqrt", base_ratio: float = 1.0, min_scale: float = 0.0) -> float:
    """The LR multiplier s for an ESS ratio r = ESS/N (see the module docstring)."""
    ratio = min(1.0, ess_ratio / base_ratio)
    scale = math.sqrt(ratio) if rule == "sqrt" else ratio
    return max(scale, min_scale)


def _as_ess_ratio(value: Any) -> float:
    """A float ESS/N from a float, a one-element tensor or an `ESSResult`; validated."""
    if isinstance(value, ESSResult):
        value = value.ess_ratio
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"ess_ratio: expected a scalar (one-element) tensor, got shape {tuple(value.shape)}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"ess_ratio: expected a float, a scalar tensor or an ESSResult, got {type(value).__name__}")
    ratio = float(value)
    if not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"ess_ratio: expected a finite ESS/N in [0, 1], got {ratio!r}")
    if ratio > 1.0 + _RATIO_TOLERANCE:
        raise ValueError(f"ess_ratio: expected ESS/N in [0, 1], got {ratio!r} (did you pass ESS instead of ESS/N?)")
    return min(ratio, 1.0)


class ESSScaledLR(torch.optim.Optimizer):
    """Wrap an optimizer so each step runs at the schedule LR times an ESS-based scale.

    Args:
        optimizer: any optimizer with ``param_groups`` (each with an ``lr``) and ``step``.
        rule: ``"sqrt"`` (default) or ``"linear"``.
        base_ratio: the ESS ratio at and above which the LR is not reduced (default 1.0).
        min_scale: a floor on the scale s, in [0, 1] (default 0.0, as in the reference).
        on_missing: what `step` does without an ESS ratio: ``"base"`` (default; full LR, warn
            once), ``"skip"``, ``"zero"`` (the reference's η = 0) or ``"raise"``.

    Example::

        opt = sa.ESSScaledLR(torch.optim.AdamW(model.parameters(), lr=1e-6))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
        ...
        ess = sa.effective_sample_size(batch.logprobs - batch.rollout_logprobs, batch.mask)
        loss.backward()
        opt.step(ess)            # or opt.step(ess.ess_ratio)
        sched.step()
        opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: Any,
        rule: str = "sqrt",
        base_ratio: float = 1.0,
        min_scale: float = 0.0,
        on_missing: str = "base",
    ) -> None:
        # No Optimizer.__init__ (it would replace the wrapped optimizer's param_groups and state,
        # which are forwarded); its hook registries are set up by `_init_hooks` instead.
        if isinstance(optimizer, ESSScaledLR):
            raise TypeError("optimizer: already an ESSScaledLR; wrap the underlying optimizer once")
        groups = getattr(optimizer, "param_groups", None)
        if not callable(getattr(optimizer, "step", None)) or not isinstance(groups, list):
            raise TypeError(
                f"optimizer: expected a torch optimizer (with param_groups and step), got {type(optimizer).__name__}"
            )
        for i, group in enumerate(groups):
            if "lr" not in group:
                raise ValueError(f"optimizer: param_groups[{i}] has no 'lr'")
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {list(RULES)}, got {rule!r}")
        if isinstance(base_ratio, bool) or not isinstance(base_ratio, int | float) or not math.isfinite(base_ratio):
            raise ValueError(f"base_ratio: expected a finite number > 0, got {base_ratio!r}")
        if not base_ratio > 0:
            raise ValueError(f"base_ratio: expected a finite number > 0, got {base_ratio!r}")
        if isinstance(min_scale, bool) or not isinstance(min_scale, int | float) or not 0.0 <= min_scale <= 1.0:
            raise ValueError(f"min_scale: expected a number in [0, 1], got {min_scale!r}")
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing: expected one of {list(ON_MISSING)}, got {on_missing!r}")
        self.optimizer = optimizer
        self.rule = rule
        self.base_ratio = float(base_ratio)
        self.min_scale = float(min_scale)
        self.on_missing = on_missing
        self.num_steps = 0
        self.last_scale: float | None = None
        self.last_ess_ratio: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._pending: float | None = None
        self._warned_missing = False
        self._init_hooks()

    def _init_hooks(self) -> None:
        """The hook registries `torch.optim.Optimizer.__init__` creates, and its hooked ``step``."""
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._patch_step_function()  # wraps type(self).step once: runs the step pre/post hooks

    # ------------------------------------------------------------------ forwarding
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return getattr(self.optimizer, "defaults", {})

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        return (
            f"ESSScaledLR({self.optimizer!r}, rule={self.rule!r}, base_ratio={self.base_ratio}, "
            f"min_scale={self.min_scale}, on_missing={self.on_missing!r})"
        )

    # ------------------------------------------------------------------ stepping
    def set_ess_ratio(self, ess_ratio: Any) -> None:
        """Stage the ESS ratio for the next `step` call that gets none (for trainers that call ``step()``)."""
        self._pending = _as_ess_ratio(ess_ratio)

    def scale_for(self, ess_ratio: Any) -> float:
        """The LR multiplier s this wrapper applies for ``ess_ratio`` (no side effects)."""
        return ess_lr_scale(_as_ess_ratio(ess_ratio), self.rule, self.base_ratio, self.min_scale)

    # ``ess_ratio`` comes first, before ``closure``: `torch.optim.Optimizer.step` takes only a
    # closure, so this signature deliberately differs from it (a closure still works by keyword).
    def step(self, ess_ratio: Any = None, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """`scaled_step`, with the step pre/post hooks registered on this wrapper around it."""
        return self.scaled_step(ess_ratio, closure)

    def scaled_step(self, ess_ratio: Any = None, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer at ``lr · s``; the previous ``lr`` values are restored.

        Args:
            ess_ratio: ESS/N in [0, 1] as a float, a one-element tensor or an `ESSResult`. When
                ``None``, the value staged by `set_ess_ratio` is used; if none, ``on_missing``.
            closure: passed to the wrapped optimizer's ``step``.

        Returns:
            what the wrapped ``step`` returns (the closure's loss), or ``None`` when skipped.
        """
        if callable(ess_ratio) and not isinstance(ess_ratio, torch.Tensor | ESSResult) and closure is None:
            ess_ratio, closure = None, ess_ratio  # step(closure) positional, as torch optimizers accept
        ratio = _as_ess_ratio(ess_ratio) if ess_ratio is not None else self._pending
        self._pending = None
        if ratio is None and self.on_missing == "raise":
            raise ValueError("ess_ratio: required by ESSScaledLR(on_missing='raise'); pass opt.step(ess_ratio)")
        self.num_steps += 1  # calls that got past validation, including skipped steps
        metrics: dict[str, float] = {"vcpo/ess_missing": float(ratio is None)}
        if ratio is None:
            if self.on_missing == "skip":
                self.last_scale, self.last_ess_ratio = 0.0, None
                self.last_metrics = {**metrics, "vcpo/lr_scale": 0.0, "vcpo/lr": 0.0}
                return None
            if self.on_missing == "base" and not self._warned_missing:
                warnings.warn(
                    "ESSScaledLR.step() got no ess_ratio; stepping at the unscaled learning rate "
                    "(on_missing='base'; warned once). Pass opt.step(ess_ratio) or choose on_missing.",
                    stacklevel=2,
                )
                self._warned_missing = True
            scale = 1.0 if self.on_missing == "base" else 0.0
        else:
            scale = ess_lr_scale(ratio, self.rule, self.base_ratio, self.min_scale)
            metrics["vcpo/ess_ratio"] = ratio
        groups = self.optimizer.param_groups
        previous = [group["lr"] for group in groups]
        try:
            for group, lr in zip(groups, previous, strict=True):
                group["lr"] = lr * scale
            used = groups[0]["lr"] if groups else 0.0
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        finally:
            for group, lr in zip(groups, previous, strict=True):
                group["lr"] = lr
        self.last_scale, self.last_ess_ratio = scale, ratio
        metrics["vcpo/lr_scale"] = scale
        metrics["vcpo/lr"] = float(used)
        self.last_metrics = metrics
        return result

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus this wrapper's state under ``"ess_scaled_lr"``.

        A plain optimizer's ``load_state_dict`` ignores the extra key, and `load_state_dict`
        accepts a plain optimizer state dict, so checkpoints move both ways. State-dict hooks
        registered on the wrapper run as in `torch.optim.Optimizer.state_dict`.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = dict(self.optimizer.state_dict())
        state[_STATE_KEY] = {
            "num_steps": self.num_steps,
            "last_scale": self.last_scale,
            "last_ess_ratio": self.last_ess_ratio,
            "pending_ess_ratio": self._pending,
            "warned_missing": self._warned_missing,
            "rule": self.rule,
            "base_ratio": self.base_ratio,
            "min_scale": self.min_scale,
            "on_missing": self.on_missing,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and this wrapper's counters.

        Settings (rule, base_ratio, min_scale, on_missing) stay as constructed; a checkpoint
        saved with other settings gives a warning. Load-state-dict hooks registered on the
        wrapper run as in `torch.optim.Optimizer.load_state_dict` (a pre-hook may return a new dict).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_own_state(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        inner = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        self.optimizer.load_state_dict(inner)
        own = state_dict.get(_STATE_KEY)
        if own is None:
            return
        self.num_steps = int(own.get("num_steps", 0))
        self.last_scale = own.get("last_scale")
        self.last_ess_ratio = own.get("last_ess_ratio")
        self._pending = own.get("pending_ess_ratio")
        self._warned_missing = bool(own.get("warned_missing", False))
        saved = {k: own.get(k) for k in ("rule", "base_ratio", "min_scale", "on_missing")}
        current = {"rule": self.rule, "base_ratio": self.base_ratio, "min_scale": self.min_scale}
        current["on_missing"] = self.on_missing
        changed = sorted(k for k, v in saved.items() if v is not None and v != current[k])
        if changed:
            warnings.warn(
                f"ESSScaledLR.load_state_dict: checkpoint settings differ for {changed}; keeping the constructor's",
                stacklevel=2,
            )
