"""CPU loaders for SkyRL's and AReaL's real loss code (importable as ``skyrl_areal_loaders``).

Both packages' top-level ``__init__`` files pull in what their loss code does not need:

* SkyRL 0.3.0: ``skyrl/backends/__init__.py`` imports the Tinker engine backend, whose pydantic
  model uses ``typing.TypedDict`` and does not build on Python < 3.12. On 3.12 it imports as it
  is; below 3.12 we register a bare package object for ``skyrl.backends`` whose ``__path__`` is
  the real folder (OpenRLHF's own tests load their loss module this way), then import
  ``skyrl.backends.skyrl_train.utils.ppo_utils`` and the worker module for real.
* AReaL 1.0.4: ``areal/trainer/__init__.py`` and ``areal/trainer/ppo/__init__.py`` import every
  trainer (SFT, DPO, reward model, the full PPO trainer with its rollout stack). We register bare
  packages for those two only; ``import areal`` itself and ``areal.trainer.ppo.actor`` (with
  ``grpo_loss_fn``) run unmodified.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import pytest


def _bare_package(name: str, folder: str) -> None:
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [folder]
        sys.modules[name] = package


def load_skyrl() -> Any:
    """SkyRL's ``ppo_utils`` module (with ``PolicyLossRegistry`` and the built-in losses)."""
    skyrl = pytest.importorskip("skyrl")
    if sys.version_info < (3, 12):
        _bare_package("skyrl.backends", os.path.join(os.path.dirname(skyrl.__file__), "backends"))
    return importlib.import_module("skyrl.backends.skyrl_train.utils.ppo_utils")


def load_skyrl_adapter() -> Any:
    """``stable_async.integrations.skyrl`` (after `load_skyrl`)."""
    load_skyrl()
    return importlib.import_module("stable_async.integrations.skyrl")


def load_areal_actor() -> Any:
    """AReaL's ``areal.trainer.ppo.actor`` module (``grpo_loss_fn``, ``PPOActor``)."""
    areal = pytest.importorskip("areal")
    root = os.path.dirname(areal.__file__)
    _bare_package("areal.trainer", os.path.join(root, "trainer"))
    _bare_package("areal.trainer.ppo", os.path.join(root, "trainer", "ppo"))
    return importlib.import_module("areal.trainer.ppo.actor")


def load_areal_adapter() -> Any:
    """``stable_async.integrations.areal`` (after `load_areal_actor`)."""
    load_areal_actor()
    return importlib.import_module("stable_async.integrations.areal")


def skyrl_worker_lookup(name: str) -> list:
    """Run in a Ray worker process: SkyRL's registry lookup there (it syncs from SkyRL's named
    registry actor), then the loss on fixed inputs. Returns the function's module and name, the
    loss value and the worker's pid."""
    import torch

    registry = load_skyrl().PolicyLossRegistry
    fn = registry.get(name)
    from skyrl.train.config import AlgorithmConfig

    lp = torch.linspace(-2.0, -0.5, 6, dtype=torch.float64).reshape(2, 3)
    loss, _ = fn(lp, lp - 0.1, torch.ones_like(lp), config=AlgorithmConfig(), loss_mask=torch.ones_like(lp))
    return [fn.__module__, fn.__name__, float(loss), os.getpid()]
