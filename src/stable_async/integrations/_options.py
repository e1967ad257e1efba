"""Shared by the adapters: how an on/off-or-settings option (``ess_lr=``, ``gac=``) is read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def option_settings(value: Any, argument: str) -> dict[str, Any] | None:
    """None/False → off (None); True → defaults ({}); a mapping → its keyword arguments."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{argument}: expected True, False, None or a dict of keyword arguments, got {value!r}")
