"""Gradient Alignment Control (GAC), arXiv 2603.01501 — **the update rule is a reconstruction**.

Only the paper's abstract and summaries were readable. Diagnosis (from the abstract): under
asynchrony, consecutive policy gradients stay highly aligned (cos(g_t, g_{t−1}) persistently
high) where synchronous training gives near-orthogonal ones; stale-aligned updates compound
and overshoot. Reconstructed rule, with g_t the flattened *global* gradient after DP reduction
and before the optimizer, d = g_{t−1}/‖g_{t−1}‖ and c_t = ⟨g_t, g_{t−1}⟩ / (‖g_t‖‖g_{t−1}‖):

    project:  if c_t > τ and ⟨g_t, d⟩ > 0:   g_t ← g_t − λ·⟨g_t, d⟩·d      (one-sided)
    skip:     if c_t > τ_skip:                g_t ← 0, and the caller skips optimizer.step()
    monitor:  never edits; metrics only.

τ is fixed (``threshold``) or adaptive, τ_t = m̂ + k·ŝ with m̂, ŝ the bias-corrected EMA mean and
std of the previous steps' c (momentum β). After the step, g_t (``keep="raw"``, default) or
the regulated gradient (``keep="regulated"``) is stored as the next g_{t−1}.

Rollout batches: with several optimizer steps per rollout batch (PPO minibatches), call
`GradientAlignmentControl.new_rollout_batch` before the first step of each batch; every step of
the batch is then compared with the *last* gradient of the *previous* rollout batch, never with
another minibatch of the same batch (those share their rollouts, so their gradients are aligned
by construction). Without the call each ``apply()`` is its own rollout batch.

Layout: pure functions compute the alignment sums (`alignment_sums`), the cosine (`cosine`),
the threshold (`adaptive_threshold`), the decision (`decide`) and the projection (`project_`);
`GACStatistics` is the adaptive state, `GradientMemory` the stored g_{t−1} (with
`SketchMemory` for ``memory="sketch"``); `GradientAlignmentControl.apply` composes them.

Defaults: mode="project", τ=0.5, λ=1.0, one-sided, fixed τ, keep="raw", memory="full".
The paper's own defaults are unknown; these are ours.

Costs: one stored gradient (``memory="full"``: a copy in fp32, or fp64 for fp64 grads;
``"bf16"``: half of that; ``"sketch"``: by default max(1024, numel/256) numbers per parameter
tensor, ≈ 0.4 % of the parameters), one pass
over the gradients for three local sums (⟨g_t, g_{t−1}⟩, ‖g_t‖², ‖g_{t−1}‖², never a
concatenated copy), **one** SUM all-reduce of those numbers when the gradient is sharded, one
host sync, and one more pass to project. Full details and the alternatives: docs/gac.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stable_async.distributed import all_reduce_sum, rank, world_size

try:  # DTensor (FSDP2 shards) is optional: older or stripped-down torch builds lack it.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

MODES = ("project", "skip", "monitor")
MEMORY_MODES = ("full", "bf16", "sketch")
KEEP_MODES = ("raw", "regulated")
ACTIONS = ("pass", "project", "skip")  # gac/action = index in this tuple
DEFAULT_SKETCH_FRACTION = 1 / 256  # default sketch budget: this fraction of each tensor's numel ...
MIN_SKETCH_DIM = 1024  # ... but at least this many numbers (tensors up to this size are stored exactly)
_SKETCH_CHUNK = 1 << 22  # elements hashed at once (bounds the temporary index tensor)
_MASK64 = (1 << 64) - 1


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly DTensor) tensor; in-place edits reach the DTensor."""
    return t.to_local() if _is_dtensor(t) else t


def _replicas(t: torch.Tensor, index: int) -> int:
    """How many ranks of the mesh hold this DTensor's local piece (its sum is divided by it)."""
    if not _is_dtensor(t):
        return 1
    count = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise RuntimeError(
                f"GradientAlignmentControl: the gradient of parameter {index} is a Partial DTensor "
                "(not reduced yet); call apply() after the gradient reduction"
            )
        if placement.is_replicate():
            count *= t.device_mesh.size(dim)
    return count


def _mix_seed(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit seed per (seed, parameter, rank)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def count_sketch(flat: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Signed-hash (CountSketch) projection of a 1-D tensor to ``dim`` numbers, computed chunk-wise.

    Each coordinate j goes to bucket h(j) with sign s(j) = ±1, drawn from a generator seeded with
    ``seed`` on the tensor's device, so the same ``seed`` gives the same map every step.
    ⟨S a, S b⟩ is unbiased for ⟨a, b⟩ with variance (‖a‖²‖b‖² + ⟨a,b⟩² − 2Σa_j²b_j²)/dim, as for
    a dense Rademacher sketch, at O(numel) cost instead of O(numel·dim). Tensors with at most
    ``dim`` elements are returned exactly (a copy).

    The hash code c ∈ [0, 2·dim) gives bucket c >> 1 and sign − for odd c. Instead of building the
    signs and the bucket index (five elementwise passes), the values are accumulated into 2·dim
    slots indexed by c itself, and the sketch is slot 2b minus slot 2b+1: the same map, one pass.
    """
    dtype = _work_dtype(flat)
    if flat.numel() <= dim:
        return flat.to(dtype, copy=True)
    slots = torch.zeros(2 * dim, dtype=dtype, device=flat.device)
    gen = torch.Generator(device=flat.device)
    gen.manual_seed(seed)
    for start in range(0, flat.numel(), _SKETCH_CHUNK):
        chunk = flat[start : start + _SKETCH_CHUNK].to(dtype)
        code = torch.randint(0, 2 * dim, (chunk.numel(),), generator=gen, device=flat.device)
        slots.index_add_(0, code, chunk)
    pairs = slots.view(dim, 2)
    return pairs[:, 0] - pairs[:, 1]


def default_sketch_dim(numel: int) -> int:
    """Default sketch size of one tensor: ``numel / 256`` rounded up, at least ``MIN_SKETCH_DIM``,
    at most ``numel`` (exact). ≈ 0.4 % of the parameter memory on models whose parameters sit in
    tensors much larger than 256k elements (LLMs); at most ``MIN_SKETCH_DIM`` per small tensor."""
    return min(numel, max(MIN_SKETCH_DIM, math.ceil(numel * DEFAULT_SKETCH_FRACTION)))


# ----------------------------------------------------------------------------- pure functions

Grads = Sequence[torch.Tensor | None]


def alignment_sums(
    grads: Grads,
    weights: Sequence[float],
    reference: Grads,
    device: torch.device,
    sketches: Grads | None = None,
) -> torch.Tensor:
    """This rank's weighted sums (⟨g, r⟩, ‖g‖², ‖r‖²) over its gradient pieces, fp64, shape (3,).

    With ``sketches`` (the sketch memory) the sums are (⟨Sg, r⟩, ‖Sg‖², ‖r‖², ‖g‖²), shape (4,):
    the first three estimate the cosine, the last is the exact norm. ``reference`` holds the
    stored g_{t−1} (None where absent); ``weights`` divide replicated DTensor pieces. Summed over
    the ranks of a sharded gradient they are the global sums.
    """
    parts = []
    for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
        if g is None:
            continue
        dtype = _work_dtype(g)
        f = g.reshape(-1).to(dtype)
        gg = torch.dot(f, f)
        prev = reference[i]
        if sketches is not None:
            s = sketches[i]
            assert s is not None
            zero = torch.zeros((), dtype=dtype, device=g.device)
            dot = torch.dot(s, prev.to(dtype)) if prev is not None else zero
            pp = torch.dot(prev.to(dtype), prev.to(dtype)) if prev is not None else zero
            part = torch.stack([dot, torch.dot(s, s), pp, gg])
        elif prev is None:
            part = torch.stack([torch.zeros_like(gg), gg, torch.zeros_like(gg)])
        else:
            p64 = prev.reshape(-1).to(dtype)
            part = torch.stack([torch.dot(f, p64), gg, torch.dot(p64, p64)])
        parts.append(part.to(device=device, dtype=torch.float64) * w)
    if not parts:
        return torch.zeros(3 if sketches is None else 4, dtype=torch.float64, device=device)
    return torch.stack(parts).sum(0)


def cosine(dot: float, gg: float, pp: float) -> float:
    """c = ⟨g, r⟩ / (‖g‖‖r‖) clamped to [−1, 1]; NaN when a norm is 0 or a sum is not finite."""
    if not (math.isfinite(dot) and math.isfinite(gg) and math.isfinite(pp)) or not (gg > 0 and pp > 0):
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(gg * pp)))


@dataclass(frozen=True)
class GACStatistics:
    """The adaptive-threshold state: bias-uncorrected EMAs of c and c² over ``n`` observed cosines."""

    n: int = 0
    ema_mean: float = 0.0
    ema_sq: float = 0.0

    def observe(self, cos: float, momentum: float) -> GACStatistics:
        """The statistics with one more cosine (EMA with momentum β)."""
        return GACStatistics(
            n=self.n + 1,
            ema_mean=momentum * self.ema_mean + (1.0 - momentum) * cos,
            ema_sq=momentum * self.ema_sq + (1.0 - momentum) * cos * cos,
        )


def adaptive_threshold(stats: GACStatistics, base: float, k: float, momentum: float) -> float:
    """τ = m̂ + k·ŝ from the bias-corrected EMAs, or ``base`` until two cosines were observed."""
    if stats.n < 2:
        return base
    debias = 1.0 - momentum**stats.n
    mean, sq = stats.ema_mean / debias, stats.ema_sq / debias
    return mean + k * math.sqrt(max(sq - mean * mean, 0.0))


def decide(
    cos: float, dot: float, tau: float, mode: str, *, one_sided: bool = True, skip_threshold: float | None = None
) -> str:
    """``"pass"``, ``"project"`` or ``"skip"`` for a cosine c, the sign of ⟨g, r⟩ and τ (see module docstring)."""
    if math.isnan(cos) or mode == "monitor":
        return "pass"
    if mode == "skip":
        return "skip" if cos > (tau if skip_threshold is None else skip_threshold) else "pass"
    if skip_threshold is not None and cos > skip_threshold:
        return "skip"
    aligned = (cos > tau and dot > 0) if one_sided else abs(cos) > tau
    return "project" if aligned else "pass"


def project_(grads: Grads, reference: Grads, coef: float) -> None:
    """g ← g − coef·r in place, coef = λ⟨g, r⟩/‖r‖² (pieces without a stored r are left alone)."""
    for g, r in zip(grads, reference, strict=True):
        if g is not None and r is not None:
            g.add_(r, alpha=-coef)


def zero_(grads: Grads) -> None:
    """g ← 0 in place (a skipped step)."""
    for g in grads:
        if g is not None:
            g.zero_()


# ----------------------------------------------------------------------------- memory


class SketchMemory:
    """The CountSketch map of ``memory="sketch"``: one sketch size per parameter tensor, and a hash
    seeded with (``seed``, parameter index, rank) so every step uses the same map."""

    def __init__(self, numels: Sequence[int], sketch_dim: int | None, seed: int) -> None:
        self.sketch_dim, self.seed = sketch_dim, seed
        self.dims = [self.dim_of(n) for n in numels]

    def dim_of(self, numel: int) -> int:
        return default_sketch_dim(numel) if self.sketch_dim is None else min(numel, self.sketch_dim)

    def compress(self, grads: Grads, rank: int) -> list[torch.Tensor | None]:
        """S g per parameter tensor (None where the gradient is None); ``rank`` 0 unless sharded."""
        return [
            None if g is None else count_sketch(g.reshape(-1), self.dim_of(g.numel()), _mix_seed(self.seed, i, rank))
            for i, g in enumerate(grads)
        ]


class GradientMemory:
    """The stored gradient r = g_{t−1} (``reference``) and, within a rollout batch, the newest one.

    Without rollout batches every stored gradient becomes the reference at once. After
    `new_rollout_batch` has been called, stored gradients wait in ``pending`` and the newest one
    becomes the reference at the next call.
    """

    def __init__(self, n: int) -> None:
        self.reference: list[torch.Tensor | None] = [None] * n
        self.has_reference = False
        self.by_rollout_batch = False
        self.pending: list[torch.Tensor | None] | None = None

    def store(self, tensors: list[torch.Tensor | None]) -> None:
        if self.by_rollout_batch:
            self.pending = tensors
        else:
            self.reference, self.has_reference = tensors, True

    def new_rollout_batch(self) -> None:
        self.by_rollout_batch = True
        if self.pending is not None:
            self.reference, self.has_reference, self.pending = self.pending, True, None

    def clear(self) -> None:
        self.reference, self.has_reference, self.pending = [None] * len(self.reference), False, None


class GradientAlignmentControl:
    """Measure, and optionally cut, the alignment of consecutive global gradients (GAC).

    Call ``metrics = gac.apply()`` after ``backward()`` (after the last micro-batch and the DP
    reduction) and before ``optimizer.step()``; it edits ``.grad`` in place. In skip mode check
    ``gac.should_skip`` and do not call ``optimizer.step()`` when it is True. With several
    optimizer steps per rollout batch, call ``gac.new_rollout_batch()`` before the first one.

    Args:
        params: tensors (or optimizer-style param groups) whose ``.grad`` form g_t. Parameters whose
            ``.grad`` is None this step are left out of g_t *and* g_{t−1} and never edited.
        mode: ``"project"`` (remove λ of the parallel component), ``"skip"`` (zero the gradient,
            set ``should_skip``) or ``"monitor"`` (metrics only).
        threshold: τ in [−1, 1]: act when c_t > τ. With ``adaptive=True``, the τ used until two
            cosines have been observed.
        strength: λ in [0, 1], the fraction of the parallel component removed.
        memory: ``"full"`` (exact copy, fp32 or the grad dtype if wider), ``"bf16"`` (bf16 copy;
            cosine error ~1e−3), ``"sketch"`` (``sketch_dim`` numbers per parameter; estimates the
            cosine; monitor and skip only, since projecting needs d itself).
        process_group: the group over which shard sums are all-reduced (default: the default group).
            Used only when the gradient is sharded.
        sharded: whether each rank holds a *disjoint piece* of g_t. ``None`` (default): True iff a
            parameter is a DTensor (FSDP2), False otherwise (one process, or DDP whose gradients
            are already identical on every rank: no collective at all). ``True``: local sums are
            all-reduced over ``process_group``; plain-tensor gradients count as disjoint slices and
            DTensor gradients are weighted by 1/(number of replicas) from their placements.
        adaptive, adaptive_k, adaptive_momentum: τ_t = m̂ + k·ŝ over the EMA (β = momentum) of the
            previous steps' cosines, once two have been observed.
        one_sided: act only when ⟨g_t, d⟩ > 0 (default). ``False``: project when |c_t| > τ.
        skip_threshold: τ_skip (fixed, even with ``adaptive``). In skip mode, defaults to τ. In project
            mode, if given, c_t > τ_skip skips the step and τ < c_t ≤ τ_skip projects.
        keep: store the ``"raw"`` g_t (default) or the ``"regulated"`` one (after projection; a
            skipped step keeps the previous stored gradient, since nothing was applied).
        sketch_dim: sketch size per parameter tensor (memory="sketch"). ``None`` (default): a budget
            proportional to each tensor, ``max(1024, ⌈numel/256⌉)`` (capped at numel, then exact), so
            the stored sketch is ≈ 0.4 % of the parameter memory on LLM-sized models; an int: that size
            for every tensor (8192 was the former default). The cosine error std is about
            (1 − c²)/√(total sketch size) or less (≤ 0.02 at 1M+ parameters with the default).
        seed: seed of the sketch hash (mixed with the parameter index and, if sharded, the rank).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        mode: str = "project",
        threshold: float = 0.5,
        strength: float = 1.0,
        memory: str = "full",
        process_group: Any = None,
        *,
        sharded: bool | None = None,
        adaptive: bool = False,
        adaptive_k: float = 2.0,
        adaptive_momentum: float = 0.9,
        one_sided: bool = True,
        skip_threshold: float | None = None,
        keep: str = "raw",
        sketch_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        self.params = _collect_params(params)
        _check_choice("mode", mode, MODES)
        _check_choice("memory", memory, MEMORY_MODES)
        _check_choice("keep", keep, KEEP_MODES)
        _check_range("threshold", threshold, -1.0, 1.0)
        _check_range("strength", strength, 0.0, 1.0)
        if skip_threshold is not None:
            _check_range("skip_threshold", skip_threshold, -1.0, 1.0)
        _check_range("adaptive_k", adaptive_k, 0.0, math.inf)
        _check_range("adaptive_momentum", adaptive_momentum, 0.0, 1.0, closed_high=False)
        _check_flag("adaptive", adaptive)
        _check_flag("one_sided", one_sided)
        if sketch_dim is not None and (
            isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1
        ):
            raise ValueError(f"GradientAlignmentControl: sketch_dim must be a positive int, got {sketch_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"GradientAlignmentControl: seed must be an int, got {seed!r}")
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(f"GradientAlignmentControl: sharded must be None, True or False, got {sharded!r}")
        if memory == "sketch" and mode == "project":
            raise ValueError(
                "GradientAlignmentControl: memory='sketch' supports mode='monitor' or 'skip' only "
                "(projection needs the previous gradient itself); use memory='full' or 'bf16'"
            )
        has_dtensor = any(_is_dtensor(p) for p in self.params)
        if sharded is False and has_dtensor:
            raise ValueError(
                "GradientAlignmentControl: sharded=False but the parameters are DTensors (FSDP2 shards); "
                "leave sharded=None or set sharded=True"
            )
        self.mode, self.memory, self.keep = mode, memory, keep
        self.threshold, self.strength, self.skip_threshold = float(threshold), float(strength), skip_threshold
        self.adaptive, self.adaptive_k, self.adaptive_momentum = adaptive, float(adaptive_k), adaptive_momentum
        self.one_sided, self.sketch_dim, self.seed = one_sided, sketch_dim, seed
        self.process_group = process_group
        self.sharded = has_dtensor if sharded is None else sharded
        self.step = 0
        self.should_skip = False
        self.last_action = "pass"
        self.last_metrics: dict[str, float] = {}
        self.statistics = GACStatistics()
        self.stored = GradientMemory(len(self.params))
        self.sketch = SketchMemory([_local(p).numel() for p in self.params], sketch_dim, seed)
        self.sketch_dims = self.sketch.dims

    def _sketch_rank(self) -> int:
        return rank(self.process_group) if self.sharded and self.memory == "sketch" else 0

    def current_threshold(self) -> float:
        """τ for the next ``apply()``: fixed, or m̂ + k·ŝ once two cosines have been observed."""
        if not self.adaptive:
            return self.threshold
        return adaptive_threshold(self.statistics, self.threshold, self.adaptive_k, self.adaptive_momentum)

    def new_rollout_batch(self) -> None:
        """Start a rollout batch: its steps compare with the last gradient of the previous batch.

        Call it once per rollout batch, before the batch's first ``apply()``. From the first call
        on, the gradients stored during a batch become the reference only at the next call.
        """
        self.stored.new_rollout_batch()

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Measure c_t, act on ``.grad`` in place, store g_t; returns the ``gac/*`` metrics."""
        grads = [None if p.grad is None else _local(p.grad) for p in self.params]
        weights = [1.0 if p.grad is None else 1.0 / _replicas(p.grad, i) for i, p in enumerate(self.params)]
        device = next((g.device for g in grads if g is not None), _local(self.params[0]).device)
        sketches = self.sketch.compress(grads, self._sketch_rank()) if self.memory == "sketch" else None
        local = alignment_sums(grads, weights, self.stored.reference, device, sketches)
        if self.sharded and world_size(self.process_group) > 1:
            local = all_reduce_sum(local, self.process_group)  # the one collective of the step
        sums = local.tolist()  # one host sync
        dot, gg_est, pp = sums[:3]
        gg = sums[3] if sketches is not None else gg_est
        finite = all(math.isfinite(v) for v in sums)

        cos = cosine(dot, gg_est, pp) if finite and self.stored.has_reference else math.nan
        tau = self.current_threshold()
        action = decide(cos, dot, tau, self.mode, one_sided=self.one_sided, skip_threshold=self.skip_threshold)
        storable = finite and gg > 0 and not (action == "skip" and self.keep == "regulated")
        raw = sketches if sketches is not None else self._copies(grads) if storable and self.keep == "raw" else None
        if action == "skip":
            zero_(grads)
        elif action == "project":
            project_(grads, self.stored.reference, self.strength * dot / pp)
        if storable:
            self.stored.store(raw if raw is not None else self._copies(grads))
        if not math.isnan(cos):
            self.statistics = self.statistics.observe(cos, self.adaptive_momentum)
        return self._finish(action, cos, tau, gg, finite)

    def _copies(self, grads: Grads) -> list[torch.Tensor | None]:
        dtype = torch.bfloat16 if self.memory == "bf16" else None
        return [
            None if g is None else g.to(dtype or torch.promote_types(g.dtype, torch.float32), copy=True) for g in grads
        ]

    def _finish(self, action: str, cos: float, tau: float, gg: float, finite: bool) -> dict[str, float]:
        self.step += 1
        self.should_skip = action == "skip"
        self.last_action = action
        removed = {"pass": 0.0, "project": self.strength**2 * cos * cos, "skip": 1.0}[action]
        self.last_metrics = {
            "gac/cos": cos,
            "gac/parallel_frac": cos * cos,
            "gac/removed_frac": removed if finite else math.nan,
            "gac/action": float(ACTIONS.index(action)),
            "gac/threshold": tau,
            "gac/grad_norm": math.sqrt(gg) if finite and gg >= 0 else math.nan,
        }
        return dict(self.last_metrics)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stored g_{t−1} (this rank's pieces), adaptive statistics, step count, sketch seed, and
        the rollout-batch bookkeeping (whether `new_rollout_batch` is in use, the pending gradient).

        Like ``torch.optim.Optimizer.state_dict()``, the tensors are references, not copies (GAC
        never edits them in place, so the snapshot stays valid while training continues).
        """
        pending = self.stored.pending
        return {
            "version": 1,
            "step": self.step,
            "memory": self.memory,
            "sketch_dim": self.sketch_dim,
            "seed": self.seed,
            "sketch_rank": self._sketch_rank(),
            "has_prev": self.stored.has_reference,
            "prev": _detached(self.stored.reference),
            "adaptive": {
                "n": self.statistics.n,
                "ema_mean": self.statistics.ema_mean,
                "ema_sq": self.statistics.ema_sq,
            },
            "rollout_batch": {
                "enabled": self.stored.by_rollout_batch,
                "pending": None if pending is None else _detached(pending),
            },
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a ``state_dict()``. A stored gradient that does not fit the current parameters
        (other sharding, memory mode or sketch seed) raises with ``strict=True``; with
        ``strict=False`` it is dropped (the next step then acts as a first step). A checkpoint
        without rollout-batch bookkeeping (older versions) restores as "not in use"."""
        problem = self._layout_problem(state)
        if problem is not None and strict:
            raise ValueError(f"GradientAlignmentControl.load_state_dict: {problem} (pass strict=False to drop it)")
        self.step = int(state["step"])
        adaptive = state["adaptive"]
        self.statistics = GACStatistics(int(adaptive["n"]), adaptive["ema_mean"], adaptive["ema_sq"])
        rollout_batch = state.get("rollout_batch", {"enabled": False, "pending": None})
        self.stored.clear()
        self.stored.by_rollout_batch = bool(rollout_batch["enabled"])
        if problem is not None:
            warnings.warn(f"GradientAlignmentControl: dropping the stored gradient: {problem}", stacklevel=2)
            return
        self.stored.reference = self._to_devices(state["prev"])
        self.stored.has_reference = bool(state["has_prev"])
        if rollout_batch["pending"] is not None:
            self.stored.pending = self._to_devices(rollout_batch["pending"])

    def _to_devices(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [
            None if t is None else t.detach().to(_local(p).device, copy=True)
            for t, p in zip(tensors, self.params, strict=True)
        ]

    def _layout_problem(self, state: dict[str, Any]) -> str | None:
        if state.get("version") != 1:
            return f"unknown state version {state.get('version')!r}"
        if state["memory"] != self.memory:
            return f"memory={state['memory']!r} in the checkpoint, {self.memory!r} now"
        if self.memory == "sketch":
            saved = (state["sketch_dim"], state["seed"], state["sketch_rank"])
            if saved != (self.sketch_dim, self.seed, self._sketch_rank()):
                return f"sketch (sketch_dim, seed, rank) = {saved} in the checkpoint, differs now"
            expected = self.sketch.dims
        else:
            expected = [_local(p).numel() for p in self.params]
        pending = state.get("rollout_batch", {}).get("pending")
        for name, stored in (("stored", state["prev"]), ("pending", pending)):
            if stored is None:
                continue
            if len(stored) != len(self.params):
                return f"{len(stored)} {name} tensors for {len(self.params)} parameters"
            for i, (t, n) in enumerate(zip(stored, expected, strict=True)):
                if t is not None and t.numel() != n:
                    return f"{name} tensor {i} has {t.numel()} elements, the parameter's local piece needs {n}"
        return None


def _detached(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach() for t in tensors]


def _collect_params(params: Any) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise ValueError("GradientAlignmentControl: params must be an iterable of tensors or param groups")
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        for p in [group] if isinstance(group, torch.Tensor) else group:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"GradientAlignmentControl: params must hold tensors, got {type(p).__name__}")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    if not out:
        raise ValueError("GradientAlignmentControl: params is empty")
    return out


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GradientAlignmentControl: {name} must be one of {choices}, got {value!r}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"GradientAlignmentControl: {name} must be True or False, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, closed_high: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"GradientAlignmentControl: {name} must be a number in [{low}, {high}{bracket}, got {value!r}")
