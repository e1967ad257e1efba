"""veRL 0.9.1 and TRL ≥ 1.x in one environment: veRL's value-head patch only where TRL has a value head.

The failure. veRL's FSDP engine calls ``verl.models.transformers.monkey_patch.apply_monkey_patch``
on every model it builds (no config setting skips it). That function patches
``AutoModelForCausalLMWithValueHead.state_dict`` whenever ``is_trl_available()`` — i.e. whenever a
``trl`` package is importable — importing the class from ``trl.experimental.ppo``, else from
``trl``. TRL 1.16 has it in neither place, so building any veRL actor fails with
``ImportError: cannot import name 'AutoModelForCausalLMWithValueHead' from 'trl'``.

The fix. The patch is about TRL's value-head class and nothing else: where TRL has no such
class there is nothing to patch (and veRL's own value-head loader cannot build one either). `install`
replaces the name ``is_trl_available`` *inside* ``verl.models.transformers.monkey_patch`` only
(the module-level name that function reads) with `value_head_patch_applies`: True exactly when
TRL is importable and has the class. Every other use of veRL's ``is_trl_available`` is
untouched. With an older TRL that has the class, veRL behaves as before.

The stable-async plugin runs `install` on ``import verl`` when ``trl`` is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

MONKEY_PATCH_MODULE = "verl.models.transformers.monkey_patch"
_PLACES = ("trl.experimental.ppo", "trl")


def trl_installed() -> bool:
    """True when a ``trl`` package is importable (veRL's own ``is_trl_available`` test)."""
    return importlib.util.find_spec("trl") is not None


def value_head_class() -> type | None:
    """TRL's ``AutoModelForCausalLMWithValueHead`` where veRL looks for it, or None."""
    for module_name in _PLACES:
        try:
            module = importlib.import_module(module_name)
            return getattr(module, "AutoModelForCausalLMWithValueHead")  # noqa: B009 (TRL's lazy module)
        except (ImportError, AttributeError):
            continue
    return None


def value_head_patch_applies() -> bool:
    """True when veRL's value-head ``state_dict`` patch has a class to patch."""
    return trl_installed() and value_head_class() is not None


value_head_patch_applies._stable_async_shim = True  # type: ignore[attr-defined]


def installed() -> bool:
    """True when `install` has replaced the check in veRL's monkey-patch module."""
    import sys

    module: Any = sys.modules.get(MONKEY_PATCH_MODULE)
    return module is not None and getattr(module.is_trl_available, "_stable_async_shim", False)


def install() -> bool:
    """Point veRL's value-head patch at `value_head_patch_applies`; idempotent. Returns True."""
    module: Any = importlib.import_module(MONKEY_PATCH_MODULE)
    module.is_trl_available = value_head_patch_applies
    return True


def uninstall() -> None:
    """Restore veRL's own ``is_trl_available`` in its monkey-patch module (for tests)."""
    from verl.utils.import_utils import is_trl_available

    module: Any = importlib.import_module(MONKEY_PATCH_MODULE)
    module.is_trl_available = is_trl_available


__all__ = ["install", "installed", "trl_installed", "uninstall", "value_head_class", "value_head_patch_applies"]
