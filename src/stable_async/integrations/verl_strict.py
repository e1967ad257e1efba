"""Strict mode of the veRL plugin (a leaf module: the adapter and the plugin both import it).

veRL's plugin loader swallows a failing plugin with a debug-level log. Under
``STABLE_ASYNC_STRICT=1`` stable-async raises `StrictPluginFailure` instead, a ``BaseException``
that veRL's ``except Exception`` lets through, so ``import verl`` (and the worker) aborts.
"""

from __future__ import annotations

import os

STRICT_ENV = "STABLE_ASYNC_STRICT"


class StrictPluginFailure(BaseException):
    """A failed plugin load under ``STABLE_ASYNC_STRICT=1``.

    A `BaseException`, not an `Exception`, on purpose: veRL's loader catches ``Exception``.
    """


def strict_mode() -> bool:
    """True when ``STABLE_ASYNC_STRICT`` is set to 1/true/yes/on."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


__all__ = ["STRICT_ENV", "StrictPluginFailure", "strict_mode"]
