"""`StableOptimizer` / `StableAdamW` for veRL's ``optim.optimizer_impl`` injection: GAC, then an ESS-scaled step.

The step logic is the core's (`stable_async.StableStep` over the optimizer's own
`stable_async.StepAccumulator`); this module only links veRL's loss calls to the right optimizer.

**Which optimizer a loss call records into.** veRL builds the policy loss and the optimizer
separately, and the loss function sees neither the model nor the optimizer. veRL's engine runs
one optimizer step as ``optimizer.zero_grad()`` → forward/backward of each micro-batch (one
``sa_`` loss call each) → ``optimizer.step()`` (FSDP, Megatron and the others alike:
``BaseEngine.train_batch``). So `StableOptimizer.zero_grad` *opens* that optimizer's step: every
differentiable ``sa_`` loss call until its ``step()`` records into *its* accumulator (`record`);
``step()`` closes it. The process keeps only a weak reference to the open optimizer, never a
record: with no `StableOptimizer` alive, or between steps, a loss call records nothing. Two models
with two optimizers stepped one after the other (veRL's engines) each get their own records and
metrics; a model's ``zero_grad`` clears only its own optimizer's records. Not supported: two
models whose steps interleave (A.zero_grad, B.zero_grad, A's losses, ...): a loss call records into
the optimizer whose ``zero_grad`` ran last.

**Rollout batches (GAC).** One veRL ``update_actor`` call is one rollout batch, stepped once per
mini-batch and PPO epoch; GAC must compare each step with the last gradient of the *previous*
rollout batch, not with another mini-batch of the same one
(`stable_async.GradientAlignmentControl.new_rollout_batch`). The stable-async plugin's hook on
veRL's actor worker (`stable_async.integrations.verl_worker_hooks`) calls
`StableOptimizer.rollout_batch_begins` at the start of every ``update_actor`` call, with the
registered ``sa_`` losses (config only) and with `stable_async.integrations.verl.ppo_loss` alike.
``gac_rollout_batch_steps=N`` overrides it: a new batch every N optimizer steps, whatever the
calls. Outside veRL's worker (no hook, no N), each step is its own rollout batch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

import stable_async as sa

_OPEN_STEP: weakref.ref[StableOptimizer] | None = None


def open_step() -> StableOptimizer | None:
    """The `StableOptimizer` whose step is open in this process (``zero_grad`` ran, ``step`` not yet), or None."""
    return _OPEN_STEP() if _OPEN_STEP is not None else None


def record(batch: sa.PolicyBatch) -> None:
    """Record a differentiable loss call's batch into the open step's accumulator (no-op when none is open)."""
    optimizer = open_step()
    if optimizer is not None:
        optimizer.record(batch)


def last_step_metrics() -> dict[str, float]:
    """The ``vcpo/*`` / ``gac/*`` metrics of the open optimizer's previous step (``{}`` when none is open)."""
    optimizer = open_step()
    return dict(optimizer.last_metrics) if optimizer is not None else {}


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (dict / list), other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with veRL
        pass
    return value


def _optimizer_class(inner: str | type) -> type:
    if isinstance(inner, type):
        return inner
    if not isinstance(inner, str) or "." not in inner:
        raise ValueError(f"inner: expected 'module.Class' (e.g. 'torch.optim.AdamW') or a class, got {inner!r}")
    module, _, cls = inner.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"inner: cannot import optimizer {inner!r}: {exc}") from exc


def _accepted(cls: type[Any]) -> set[str] | None:
    """Keyword arguments ``cls.__init__`` accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in ("self", "params")}


OWN_OPTIONS = (
    "inner",
    "ess_lr",
    "ess_rule",
    "ess_base_ratio",
    "ess_min_scale",
    "ess_on_missing",
    "gac",
    "gac_threshold",
    "gac_strength",
    "gac_memory",
    "gac_kwargs",
    "gac_rollout_batch_steps",
)
"""The options `StableOptimizer` reads itself; any other key goes to the inner optimizer."""


def check_inner_options(inner_cls: type, options: Mapping[str, Any], owner: str = "StableOptimizer") -> None:
    """Unknown keys fail here, naming the key (not the inner optimizer's ``__init__``)."""
    accepted = _accepted(inner_cls)
    if accepted is None:
        return
    for key in options:
        if key not in accepted:
            known = sorted(set(OWN_OPTIONS) | accepted)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{key}: not an option of {owner} (its options: {', '.join(OWN_OPTIONS)}) nor of "
                f"{inner_cls.__module__}.{inner_cls.__qualname__} ({', '.join(sorted(accepted))}){hint}"
            )


def _renamed(exc: Exception, keys: Mapping[str, str]) -> Exception:
    """``exc`` with its message led by our option name: the core names its own argument (``threshold``)."""
    message = str(exc)
    for prefix in ("GradientAlignmentControl: ", "ESSScaledLR: "):
        message = message.removeprefix(prefix)
    head = message.replace(":", " ").split()[0] if message.strip() else ""
    key = keys.get(head)
    if key is None:
        return type(exc)(message)
    rest = message[len(head) :].lstrip(": ")
    return type(exc)(f"{key}: {rest}")


class StableOptimizer(sa.ESSScaledLR):
    """An optimizer for veRL's ``optim.optimizer_impl`` injection: GAC, then an ESS-scaled step.

    ``step()`` is `stable_async.StableStep` over this optimizer's own `stable_async.StepAccumulator`:
    (1) if ``gac`` is set, `stable_async.GradientAlignmentControl.apply` on the (clipped) gradients —
    FSDP2 DTensor shards are detected and reduced with one all-reduce; in skip mode a flagged step
    does not call the inner optimizer; (2) if ``ess_lr``, the ESS of the step's sequences (all
    micro-batches since ``zero_grad``, all data-parallel ranks) and one inner step at
    ``lr · s(ESS/N)``; the schedule's LR is restored after the step.

    Args:
        params: what veRL's ``build_optimizer`` passes (``module.parameters()``) or param groups.
        lr: learning rate (veRL passes ``optim.lr``); other veRL kwargs (``weight_decay``,
            ``betas``) and unknown keys of ``override_optimizer_config`` go to the inner optimizer
            (a key it does not take fails here, naming the key).
        inner: the wrapped optimizer, ``"module.Class"`` or a class (default ``torch.optim.AdamW``).
        ess_lr: scale the LR by the ESS (default True).
        ess_rule, ess_base_ratio, ess_min_scale, ess_on_missing: `ESSScaledLR`'s ``rule``,
            ``base_ratio``, ``min_scale``, ``on_missing`` (``"base"``: full LR when no ``sa_``
            loss recorded anything this step).
        gac: None (off, default) or a GAC mode: ``"project"``, ``"skip"``, ``"monitor"``.
        gac_threshold, gac_strength, gac_memory: GAC's ``threshold``, ``strength``, ``memory``.
        gac_kwargs: further `GradientAlignmentControl` keyword arguments (e.g. ``adaptive``).
        gac_rollout_batch_steps: optimizer steps per rollout batch (None: one per veRL
            ``update_actor`` call, from the worker hook; see the module docstring).
    """

    _owner = "StableOptimizer"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        inner: str | type = "torch.optim.AdamW",
        ess_lr: bool = True,
        ess_rule: str = "sqrt",
        ess_base_ratio: float = 1.0,
        ess_min_scale: float = 0.0,
        ess_on_missing: str = "base",
        gac: str | None = None,
        gac_threshold: float = 0.5,
        gac_strength: float = 1.0,
        gac_memory: str = "full",
        gac_kwargs: Mapping[str, Any] | None = None,
        gac_rollout_batch_steps: int | None = None,
        **inner_kwargs: Any,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("params: the optimizer got no parameters")
        inner_cls = _optimizer_class(inner)
        check_inner_options(inner_cls, inner_kwargs, self._owner)
        optimizer = inner_cls(params, lr=lr, **inner_kwargs)
        ess: dict[str, Any]  # keyword arguments of different types
        ess = {"rule": ess_rule, "base_ratio": ess_base_ratio, "min_scale": ess_min_scale, "on_missing": ess_on_missing}
        try:
            super().__init__(optimizer, **ess)
        except (TypeError, ValueError) as exc:
            raise _renamed(exc, {k: f"ess_{k}" for k in ess}) from exc
        self.gac: sa.GradientAlignmentControl | None = None
        if gac is not None:
            extra = to_plain(gac_kwargs) or {}
            if not isinstance(extra, Mapping):
                raise TypeError(f"gac_kwargs: expected a dict, got {type(extra).__name__}")
            tensors = [p for group in optimizer.param_groups for p in group["params"]]
            settings: dict[str, Any]  # keyword arguments of different types
            settings = {"mode": gac, "threshold": gac_threshold, "strength": gac_strength, "memory": gac_memory}
            try:
                self.gac = sa.GradientAlignmentControl(tensors, **settings, **dict(extra))
            except (TypeError, ValueError) as exc:
                keys = {"mode": "gac", **{k: f"gac_{k}" for k in settings if k != "mode"}}
                raise _renamed(exc, {**{k: f"gac_kwargs.{k}" for k in extra}, **keys}) from exc
        steps = gac_rollout_batch_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"gac_rollout_batch_steps: expected an integer >= 1 or None, got {steps!r}")
        self.gac_rollout_batch_steps = steps
        self._steps_in_batch = 0
        if steps is not None:
            self.new_rollout_batch()
        self.accumulator = sa.StepAccumulator()
        self.stable_step = sa.StableStep(self, self.accumulator, gac=self.gac, ess_lr=ess_lr)
        self.ess_lr = self.stable_step.ess_lr

    # ------------------------------------------------------------------ the step window
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, clear this optimizer's records and open its step (loss calls record here)."""
        global _OPEN_STEP
        self.accumulator.clear()
        super().zero_grad(set_to_none=set_to_none)
        _OPEN_STEP = weakref.ref(self)

    def record(self, batch: sa.PolicyBatch) -> None:
        """Record a micro-batch's log-weights log π_θ − log μ (only with ESS-LR on)."""
        if self.ess_lr:
            self.accumulator.record(batch)

    def new_rollout_batch(self) -> None:
        """The next step starts a new rollout batch: GAC compares it with the previous batch's last gradient."""
        self._steps_in_batch = 0
        if self.gac is not None:
            self.gac.new_rollout_batch()

    def rollout_batch_begins(self) -> None:
        """A veRL ``update_actor`` call starts (worker hook): new rollout batch, unless ``gac_rollout_batch_steps``."""
        if self.gac_rollout_batch_steps is None:
            self.new_rollout_batch()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """GAC (if on), then one inner step at the ESS-scaled LR (if on); metrics in ``last_metrics``."""
        global _OPEN_STEP
        try:
            metrics = self.stable_step(closure)
        finally:
            if open_step() is self:
                _OPEN_STEP = None
        self.last_metrics = metrics
        self._steps_in_batch += 1
        every = self.gac_rollout_batch_steps
        if every is not None and self._steps_in_batch >= every:
            self.new_rollout_batch()
        return self.stable_step.last_result

    @property
    def last_statistics(self) -> sa.StepStatistics | None:
        """The reduced step statistics of the last step (None when it had no ESS-LR part)."""
        return self.stable_step.last_statistics

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, the ESS wrapper's, and GAC's (under ``"stable_async_gac"``)."""
        state = super().state_dict()
        if self.gac is not None:
            state["stable_async_gac"] = self.gac.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        gac_state = state.pop("stable_async_gac", None)
        super().load_state_dict(state)
        if gac_state is not None and self.gac is not None:
            self.gac.load_state_dict(gac_state)


class StableAdamW(StableOptimizer):
    """`StableOptimizer` around ``torch.optim.AdamW``; its name contains "adam", so veRL passes ``betas``.

    ``actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl``
    ``actor_rollout_ref.actor.optim.optimizer=StableAdamW``
    """

    _owner = "StableAdamW"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> None:
        if "inner" in kwargs:
            raise TypeError("inner: StableAdamW always wraps torch.optim.AdamW; use StableOptimizer for another one")
        super().__init__(params, lr, inner="torch.optim.AdamW", **kwargs)


def check_options(optimizer: str, options: Mapping[str, Any], lr: float = 1e-3) -> None:
    """Build ``optimizer`` ("StableOptimizer" / "StableAdamW") on one dummy parameter with ``options``.

    What veRL's ``build_optimizer`` would do in the worker, at config time: every key and value is
    checked and an error names the key.
    """
    cls = {"StableOptimizer": StableOptimizer, "StableAdamW": StableAdamW}[optimizer]
    dummy = torch.nn.Parameter(torch.zeros(1))
    global _OPEN_STEP
    before = _OPEN_STEP
    try:
        cls([dummy], lr=lr, **dict(options))
    finally:
        _OPEN_STEP = before


__all__ = [
    "OWN_OPTIONS",
    "StableAdamW",
    "StableOptimizer",
    "check_inner_options",
    "check_options",
    "last_step_metrics",
    "open_step",
    "record",
    "to_plain",
]
