"""Timing and memory helpers shared by the overhead benchmarks.

Every figure the benchmark reports is a *ratio* against a reference measured in the same process,
in the same run, interleaved: repetition r runs every variant once (in a rotating order), and the
ratio of repetition r is ``time(variant) / time(reference)`` of that repetition. The reported
ratio is the median over repetitions of those paired ratios, which cancels slow drifts of a
shared machine (another job starting) that a ratio of two separately taken medians would not.

Peak memory is measured on CPU with ``torch.profiler`` (``profile_memory=True``): every tensor
allocation and free of PyTorch's CPU allocator is recorded as a ``[memory]`` event with a signed
size; the running sum of those sizes, in time order, is the memory allocated since the start of
the profiled region, and its maximum is the peak *extra* memory of the region (tensors that exist
before the region, like the inputs, are not counted; tensors freed inside it count as negative).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Per-variant seconds per call (median over repetitions) and paired ratios to the reference."""

    reference: str
    seconds: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    ratio_spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # (q25, q75) of paired ratios
    samples: dict[str, list[float]] = field(default_factory=dict)  # seconds per call, per repetition

    def paired(self, name: str, against: str) -> list[float]:
        """time(name) / time(against) of each repetition."""
        return [a / b for a, b in zip(self.samples[name], self.samples[against])]

    def ratio(self, name: str, against: str) -> float:
        """Median over repetitions of time(name) / time(against), paired like `ratios`."""
        return statistics.median(self.paired(name, against))


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def interleaved(
    variants: dict[str, Callable[[], object]],
    reference: str,
    repeats: int,
    inner: int = 1,
    warmup: int = 2,
) -> Timing:
    """Time each variant ``repeats`` times (``inner`` calls per timing), interleaved; see the module docstring."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    per_rep: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
            for name in order:
                fn = variants[name]
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                per_rep[name].append((time.perf_counter() - t0) / inner)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    out = Timing(reference=reference, samples=per_rep)
    for name in names:
        out.seconds[name] = statistics.median(per_rep[name])
        paired = out.paired(name, reference)
        out.ratios[name] = statistics.median(paired)
        out.ratio_spread[name] = (_quantile(paired, 0.25), _quantile(paired, 0.75))
    return out


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator during ``fn()``, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += int(e.nbytes())
        peak = max(peak, running)
    return peak


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A plain-text or Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
