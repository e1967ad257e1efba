"""Optional ``torch.compile`` for the elementwise cores of the losses, with a clean eager fallback.

`compiled_or_eager(fn)` returns a callable that runs ``torch.compile(fn, dynamic=False)`` (one
compilation per (B, T); past dynamo's recompile limit a new shape runs eagerly) and falls back to
``fn`` itself, for good and with one warning, if compiling or running the compiled code fails:
no C++ compiler for inductor, a Python version dynamo does not support, a backend error. The
cores it wraps take validated tensors and have no error paths of their own, so any exception
from the compiled call is a compilation problem; the eager call that follows re-raises
anything genuine.

Why not ``dynamic=True`` (one compilation for every shape): with torch 2.13's inductor on CPU,
the dynamic-shape graph of the PPO surrogate returned wrong values and masks when its input
required grad (64×2048 tokens: loss off by up to 1.19, clip mask 65,856 tokens against 38,551),
while the static-shape graph matches eager to 1e-6. The overhead benchmark's correctness check
(`benchmarks/overhead/run.py --compile`, OpenRLHF case) reproduces it; a unit test at that size
(`tests/unit/test_surrogate.py`) did not reproduce it in isolation and checks the equality only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


class CompiledOrEager:
    """``fn`` through ``torch.compile`` when that works, else ``fn`` (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self.failed: BaseException | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failed is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=False)
                return self._compiled(*args)
            except Exception as err:  # any backend failure means: run eagerly
                self.failed = err
                warnings.warn(
                    f"stable-async: torch.compile of {getattr(self.fn, '__name__', self.fn)!r} failed "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "using the eager implementation from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self.fn(*args)


def compiled_or_eager(fn: Callable[..., Any]) -> CompiledOrEager:
    """Wrap ``fn`` (see `CompiledOrEager`)."""
    return CompiledOrEager(fn)
