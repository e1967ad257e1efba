"""Loss registry: one decorator to register a loss with what it needs, one lookup to build it.

    @register_loss("my_loss", config=MyConfig, requires={"rollout_logprobs"})
    def my_loss(batch: PolicyBatch, config: MyConfig) -> LossOutput: ...

    loss_fn = get_loss("my_loss", eps_high=0.3)     # -> Loss (settings + function)
    out = loss_fn(batch)                           # -> LossOutput
    loss_fn.requires, loss_fn.weights_by_rollout   # what an adapter must provide / must not add

A loss is a pure function of a `PolicyBatch` and a frozen config dataclass; `get_loss` builds
the config from keyword arguments (or takes a ready ``config=``), so an unknown hyperparameter
or an invalid value fails when the loss is built, not in the middle of training.

The registration also declares the facts a trainer adapter needs, so that no adapter keeps a
list of loss names:

- ``requires``: the optional `PolicyBatch` fields the loss reads (``logprobs``, ``advantages``
  and ``mask`` are always there). A configured `RolloutCorrection` adds ``rollout_logprobs``.
- ``weights_by_rollout``: the loss already multiplies by a weight against the behavior policy
  μ (``rollout_logprobs``), so an adapter must not apply its trainer's own IS weight on top.
- ``needs_topk``: the loss reads the rollout policy's top-K log-probs and π_θ at those ids.

Each declaration is either a value or a function of the loss's config (e.g. DPPO weights by μ
only when its weight anchor is the rollout policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from stable_async.batch import PolicyBatch
from stable_async.losses.base import LossConfig, LossOutput

LossFn = Callable[[PolicyBatch, Any], LossOutput]
T = TypeVar("T")

#: The `PolicyBatch` fields a loss may declare in ``requires``.
BATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyBatch) if f.init)
_ALWAYS_PRESENT = frozenset({"logprobs", "advantages", "mask"})


@dataclass(frozen=True)
class Declared(Generic[T]):
    """A fact about a loss: a fixed value, or a function of the loss's config."""

    value: T | Callable[[Any], T]

    def __call__(self, config: Any) -> T:
        return self.value(config) if callable(self.value) else self.value  # type: ignore[return-value]


@dataclass(frozen=True)
class LossSpec:
    """A registration: the function, its config class and its declarations (see module docstring)."""

    name: str
    fn: LossFn
    config: type
    requires: Declared[Iterable[str]]
    weights_by_rollout: Declared[bool]
    needs_topk: Declared[bool]

    def required_fields(self, config: Any) -> frozenset[str]:
        """The declared ``requires`` for ``config``, plus ``rollout_logprobs`` with a correction."""
        fields = _check_fields(self.name, self.requires(config))
        if getattr(config, "correction", None) is not None:
            fields |= {"rollout_logprobs"}
        return fields

    def flag(self, which: str, config: Any) -> bool:
        """The declared ``weights_by_rollout`` or ``needs_topk`` for ``config``."""
        value = getattr(self, which)(config)
        if not isinstance(value, bool):
            raise TypeError(f"{which}: loss {self.name!r} declared {value!r}; expected True or False")
        return value


_REGISTRY: dict[str, LossSpec] = {}


class Loss:
    """A registered loss function bound to its settings; call it on a `PolicyBatch`.

    Like ``torch.nn.CrossEntropyLoss`` around ``torch.nn.functional.cross_entropy``: the
    function is the truth, this object only holds the name and the config.

    Attributes:
        requires: frozenset of the optional `PolicyBatch` fields this loss reads with this config.
        weights_by_rollout: True if the loss already weights by the behavior policy μ.
        needs_topk: True if the loss reads top-K log-probs (``topk_logprobs``, ``current_topk_logprobs``).
    """

    def __init__(self, name: str, fn: LossFn, config: Any) -> None:
        self.name = name
        self.fn = fn
        self.config = config

    @property
    def spec(self) -> LossSpec:
        return _lookup(self.name)

    @property
    def requires(self) -> frozenset[str]:
        return self.spec.required_fields(self.config)

    @property
    def weights_by_rollout(self) -> bool:
        return self.spec.flag("weights_by_rollout", self.config)

    @property
    def needs_topk(self) -> bool:
        return self.spec.flag("needs_topk", self.config)

    def __call__(self, batch: PolicyBatch) -> LossOutput:
        if not isinstance(batch, PolicyBatch):
            raise TypeError(f"batch: expected a stable_async.PolicyBatch, got {type(batch).__name__}")
        return self.fn(batch, self.config)

    def __repr__(self) -> str:
        return f"Loss({self.name!r}, {self.config!r})"


def _check_fields(name: str, fields: Any) -> frozenset[str]:
    if isinstance(fields, str) or not isinstance(fields, Iterable):
        raise TypeError(f"requires: expected a set of PolicyBatch field names for loss {name!r}, got {fields!r}")
    fields = frozenset(fields)
    unknown = sorted(str(f) for f in fields - BATCH_FIELDS)
    if unknown:
        expected = sorted(BATCH_FIELDS)
        raise ValueError(f"requires: {unknown[0]!r} is not a PolicyBatch field; expected some of {expected}")
    return fields - _ALWAYS_PRESENT


def _declared(value: Any, check: Callable[[Any], Any]) -> Declared[Any]:
    if not callable(value):
        check(value)
    return Declared(value)


def _check_bool(what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{what}: expected True, False or a function of the config, got {value!r}")

    return check


def register_loss(
    name: str,
    *,
    config: type = LossConfig,
    requires: Iterable[str] | Callable[[Any], Iterable[str]] = frozenset(),
    weights_by_rollout: bool | Callable[[Any], bool] = False,
    needs_topk: bool | Callable[[Any], bool] = False,
    overwrite: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(batch, config) -> LossOutput`` under ``name``.

    Args:
        name: the lookup name (veRL sees it as ``sa_<name>``).
        config: a dataclass whose fields are the loss's hyperparameters (default `LossConfig`).
        requires: the optional `PolicyBatch` fields the loss reads, or a function of the config
            returning them.
        weights_by_rollout: True (or a function of the config) if the loss already multiplies by
            an importance weight against μ; adapters then add no IS weight of their own.
        needs_topk: True (or a function of the config) if the loss reads top-K log-probs.
        overwrite: allow replacing an existing registration.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config) or not isinstance(config, type):
        raise TypeError(f"config: expected a dataclass type, got {config!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected True or False, got {overwrite!r}")
    declared_requires = _declared(requires, lambda v: _check_fields(name, v))
    declared_weights = _declared(weights_by_rollout, _check_bool("weights_by_rollout"))
    declared_topk = _declared(needs_topk, _check_bool("needs_topk"))

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].fn is not fn:
            raise ValueError(f"name: a loss named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = LossSpec(name, fn, config, declared_requires, declared_weights, declared_topk)
        return fn

    return decorator


def available_losses() -> list[str]:
    """Every registered loss name, sorted."""
    return sorted(_REGISTRY)


def loss_config_class(name: str) -> type:
    """The config dataclass of a registered loss."""
    return _lookup(name).config


def loss_spec(name: str) -> LossSpec:
    """The registration of a loss: function, config class and declarations, as registered."""
    return _lookup(name)


def _lookup(name: str) -> LossSpec:
    if name not in _REGISTRY:
        raise KeyError(f"loss name: unknown loss {name!r}; available losses: {available_losses()}")
    return _REGISTRY[name]


def get_loss(name: str, config: Any = None, **hyperparameters: Any) -> Loss:
    """Build a registered loss with its settings.

    Args:
        name: a name from `available_losses()`.
        config: a ready config instance of the loss's config class (then no keywords).
        **hyperparameters: fields of the loss's config dataclass; unknown names raise.
    """
    spec = _lookup(name)
    if config is not None:
        if hyperparameters:
            raise TypeError("get_loss: pass either config= or keyword hyperparameters, not both")
        if not isinstance(config, spec.config):
            raise TypeError(f"config: expected {spec.config.__name__} for loss {name!r}, got {type(config).__name__}")
        return Loss(name, spec.fn, config)
    fields = {f.name for f in dataclasses.fields(spec.config) if f.init}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise TypeError(f"{unknown[0]}: not a hyperparameter of loss {name!r}; expected some of {sorted(fields)}")
    return Loss(name, spec.fn, spec.config(**hyperparameters))
