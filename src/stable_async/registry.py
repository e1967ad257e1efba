"""Loss registry: one decorator to register, one lookup to build.

    @register_loss("my_loss", config=MyConfig)
    def my_loss(batch: PolicyBatch, config: MyConfig) -> LossOutput: ...

    loss_fn = get_loss("my_loss", eps_high=0.3)     # -> Loss (settings + function)
    out = loss_fn(batch)                           # -> LossOutput

A loss is a pure function of a `PolicyBatch` and a frozen config dataclass; `get_loss` builds
the config from keyword arguments (or takes a ready ``config=``), so an unknown hyperparameter
or an invalid value fails when the loss is built, not in the middle of training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stable_async.batch import PolicyBatch
from stable_async.losses.base import LossConfig, LossOutput

LossFn = Callable[[PolicyBatch, Any], LossOutput]


@dataclass(frozen=True)
class _Entry:
    fn: LossFn
    config_cls: type


_REGISTRY: dict[str, _Entry] = {}


class Loss:
    """A registered loss function bound to its settings; call it on a `PolicyBatch`.

    Like ``torch.nn.CrossEntropyLoss`` around ``torch.nn.functional.cross_entropy``: the
    function is the truth, this object only holds the name and the config.
    """

    def __init__(self, name: str, fn: LossFn, config: Any) -> None:
        self.name = name
        self.fn = fn
        self.config = config

    def __call__(self, batch: PolicyBatch) -> LossOutput:
        if not isinstance(batch, PolicyBatch):
            raise TypeError(f"batch: expected a stable_async.PolicyBatch, got {type(batch).__name__}")
        return self.fn(batch, self.config)

    def __repr__(self) -> str:
        return f"Loss({self.name!r}, {self.config!r})"


def register_loss(name: str, *, config: type = LossConfig, overwrite: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(batch, config) -> LossOutput`` under ``name``.

    Args:
        name: the lookup name (veRL sees it as ``sa_<name>``).
        config: a dataclass whose fields are the loss's hyperparameters (default `LossConfig`).
        overwrite: allow replacing an existing registration.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config: expected a dataclass type, got {config!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].fn is not fn:
            raise ValueError(f"name: a loss named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = _Entry(fn=fn, config_cls=config)
        return fn

    return decorator


def available_losses() -> list[str]:
    """Every registered loss name, sorted."""
    return sorted(_REGISTRY)


def loss_config_class(name: str) -> type:
    """The config dataclass of a registered loss."""
    return _lookup(name).config_cls


def _lookup(name: str) -> _Entry:
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
    entry = _lookup(name)
    if config is not None:
        if hyperparameters:
            raise TypeError("get_loss: pass either config= or keyword hyperparameters, not both")
        if not isinstance(config, entry.config_cls):
            raise TypeError(
                f"config: expected {entry.config_cls.__name__} for loss {name!r}, got {type(config).__name__}"
            )
        return Loss(name, entry.fn, config)
    fields = {f.name for f in dataclasses.fields(entry.config_cls) if f.init}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise TypeError(f"{unknown[0]}: not a hyperparameter of loss {name!r}; expected some of {sorted(fields)}")
    return Loss(name, entry.fn, entry.config_cls(**hyperparameters))
