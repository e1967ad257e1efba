"""Reward baselines: group mean, leave-one-out (RLOO), and VCPO's off-policy optimal baseline (OPOB).

Every function takes per-sequence rewards R (B,) and returns a per-sequence baseline b (B,)
(detached, fp32 or fp64), so ``advantages = rewards − baseline``. ``group_ids`` (B,) integers
select the prompt groups; ``None`` means the whole batch is one group.

* `group_mean_baseline`: b_i = mean of R over i's group (a group of one: b = R, advantage 0;
  veRL's GRPO uses b = 0 for a group of one instead).
* `rloo_baseline`: b_i = mean of R over i's group *without* i (Kool et al. 2019); a group of
  one has no other member and gets b = 0, as in veRL's RLOO.
* `min_variance_baseline` (OPOB, VCPO arXiv 2602.17616): the constant b that minimizes the
  variance (trace of the covariance) of the off-policy REINFORCE estimator
  ĝ(b) = Σ_i ρ_i (R_i − b) g_i, g_i = ∇_θ log π_θ(τ_i), treating the samples as independent:

      b* = Σ_i W_i R_i / Σ_i W_i,   W_i = ρ_i² ‖g_i‖²   (÷ L_i² with ``length_normalized``)

  Modes (what W_i is), and their bias as the minimizer of the estimator's variance:

  ``"paper"``          ρ_i² ‖g_i‖² (÷ L_i²). Exact for the estimator whose weight is the ρ you
                       pass: if the loss truncates (min(ρ, 8) in ``vcpo``), pass ``ratio_cap=8`` so
                       W uses the truncated weight that actually multiplies g_i. Its only bias is
                       the usual one of a baseline estimated from the same samples (O(1/N)).
  ``"equal_norm"``     ρ_i² (÷ L_i²): ‖g_i‖ assumed equal. Biased (not minimum variance) when
                       gradient norms differ, e.g. long vs short responses (‖g‖² grows ~ L).
  ``"reference_code"`` ρ̄_i² ρ_i² ‖g_i‖² (÷ L_i²), with ρ̄ = min(exp(clamp(log ρ, ±20)), cap) and
                       ρ = exp(log ρ) untruncated (cap = ``ratio_cap``, default 8). What
                       mit-han-lab/vcpo computes: its per-trajectory gradient norm is measured on
                       the loss ρ̄_i·log π(τ_i), so it already contains ρ̄_i, and it multiplies by
                       ρ_i² again (``use_is_weights=True``, the shipped setting). The IS weight
                       counts twice: sequences with large ρ dominate b more than the variance
                       argument says; it is the minimum-variance b only when all ρ_i are equal.
  ``"grad_norm"``      ‖g_i‖² (÷ L_i²): ignores IS weights (on-policy optimum; the reference with
                       ``use_is_weights=False`` is this form applied to ρ̄_i g_i, which is the paper
                       form for its truncated estimator).

  Sizes of ‖g_i‖² (``grad_sq_norms``): `per_sequence_grad_sq_norms` computes them exactly with
  one backward pass per sequence (what the reference does; feasible for small models or few
  sequences). Cheap proxies, each biased as a stand-in for the exact value:
  `logit_grad_sq_norms` (the exact squared norm of the gradient with respect to the logits,
  Σ_t ‖onehot(y_t) − p_t‖²; ignores the logit Jacobian and the correlation between positions)
  and `length_grad_sq_norms` (L_i; right only if every token's score vector has the same norm
  and they are uncorrelated). The weighted mean is invariant to a common factor in W.

  Scope: ``"group"`` (default; one b per prompt group, from the group's rewards) or
  ``"minibatch"`` (one b from the whole batch, reduced over ``process_group`` when
  distributed). The reference uses raw rewards for group scope and the GRPO advantages for
  minibatch scope; pass whichever you mean as ``rewards``.

  Fallbacks: a group whose weights are all zero (e.g. every ‖g_i‖ = 0) gets the plain mean of
  its rewards; a group of one therefore always gets b = R (advantage 0).

  Numerics: W is formed in log space, log W_i = 2 log ρ_i + log ‖g_i‖² (− 2 log L_i), and
  normalized with the maximum of its group subtracted, so log-ratios of ±1e4 stay finite. The
  reference divides by Σ W + 1e-8 (which biases b toward 0 when W is tiny) and exponentiates ρ
  directly (inf/NaN for large log-ratios); we do neither.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from stable_async._numerics import LOG_RATIO_BOUND, compute_dtype, masked_sum
from stable_async.checks import check_flag, check_mask, check_optional_number, check_tensor
from stable_async.distributed import all_reduce_max, all_reduce_sum

MODES = ("paper", "equal_norm", "reference_code", "grad_norm")
SCOPES = ("group", "minibatch")
REFERENCE_RATIO_CAP = 8.0


def _rewards(rewards: Any) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or not rewards.dtype.is_floating_point or rewards.dim() != 1:
        raise TypeError("rewards: expected a 1-D floating torch.Tensor (B,)")
    r = rewards.detach().to(compute_dtype(rewards))
    if r.numel() and not bool(torch.isfinite(r).all()):
        raise ValueError("rewards: found NaN/inf")
    return r


def _group_index(group_ids: Any, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group index 0..G−1 per sample, and G."""
    if group_ids is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1 if n else 0
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError("group_ids: expected an integer torch.Tensor (B,)")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(f"group_ids: expected shape ({n},) like rewards, got {tuple(group_ids.shape)}")
    _, index = torch.unique(group_ids, return_inverse=True)
    return index.to(device), int(index.max()) + 1 if n else 0


def _per_sample(
    values: torch.Tensor | None, name: str, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    if values is None:
        return None
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor ({n},)")
    if tuple(values.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},) like rewards, got {tuple(values.shape)}")
    return values.detach().to(device=device, dtype=dtype)


def group_mean_baseline(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """b_i = the mean reward of i's group (B,)."""
    r = _rewards(rewards)
    index, g = _group_index(group_ids, r.numel(), r.device)
    sums = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, index, r)
    counts = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, index, torch.ones_like(r))
    return (sums / counts.clamp(min=1.0))[index]


def rloo_baseline(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out: b_i = (Σ_{j in group, j≠i} R_j) / (n_group − 1); 0 for a group of one (B,)."""
    r = _rewards(rewards)
    index, g = _group_index(group_ids, r.numel(), r.device)
    sums = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, index, r)
    counts = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, index, torch.ones_like(r))
    others = counts[index] - 1.0
    return torch.where(others > 0, (sums[index] - r) / others.clamp(min=1.0), torch.zeros_like(r))


def min_variance_baseline(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    log_is_weights: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    grad_sq_norms: torch.Tensor | None = None,
    mode: str = "paper",
    scope: str = "group",
    lengths: torch.Tensor | None = None,
    length_normalized: bool = False,
    ratio_cap: float | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    """VCPO's off-policy optimal baseline b* = Σ W_i R_i / Σ W_i per group (B,). See the module docstring.

    Args:
        rewards: (B,) the rewards (or advantages) the baseline is subtracted from.
        group_ids: (B,) integer prompt-group ids; ``None``: one group. Ignored for ``scope="minibatch"``.
        log_is_weights: (B,) sequence log-weights log ρ_i = Σ_t m·(log π_θ − log μ). Preferred.
        is_weights: (B,) the weights ρ_i themselves (≥ 0); give at most one of the two. Neither: ρ = 1.
        grad_sq_norms: (B,) ‖∇_θ log π_θ(τ_i)‖² (≥ 0) of the *unweighted* sequence log-prob; required
            for ``"paper"``, ``"reference_code"`` and ``"grad_norm"``, not accepted for ``"equal_norm"``.
        mode: ``"paper"`` (default), ``"equal_norm"``, ``"reference_code"`` or ``"grad_norm"``.
        scope: ``"group"`` (default) or ``"minibatch"``.
        lengths: (B,) response lengths L_i > 0; required with ``length_normalized``.
        length_normalized: divide W_i by L_i² (a length-normalized, e.g. token-mean, loss).
        ratio_cap: truncate ρ at this value inside W (``"paper"`` / ``"equal_norm"``); for
            ``"reference_code"`` the cap of ρ̄ (default 8.0).
        process_group: data-parallel group for ``scope="minibatch"`` (default: the default group
            if initialized); one max- and one sum-all-reduce.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {list(SCOPES)}, got {scope!r}")
    check_optional_number("ratio_cap", ratio_cap, low=0, low_open=True)
    check_flag("length_normalized", length_normalized)
    r = _rewards(rewards)
    n, dtype, device = r.numel(), r.dtype, r.device
    if log_is_weights is not None and is_weights is not None:
        raise ValueError("log_is_weights / is_weights: give at most one")
    log_rho = _per_sample(log_is_weights, "log_is_weights", n, dtype, device)
    if is_weights is not None:
        w = _per_sample(is_weights, "is_weights", n, dtype, device)
        assert w is not None
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("is_weights: expected finite values >= 0")
        log_rho = torch.log(w)
    if log_rho is None:
        log_rho = torch.zeros_like(r)
    elif bool(torch.isnan(log_rho).any()) or bool((log_rho == float("inf")).any()):
        raise ValueError("log_is_weights: found NaN/+inf")

    sq = _per_sample(grad_sq_norms, "grad_sq_norms", n, dtype, device)
    if mode == "equal_norm":
        if sq is not None:
            raise ValueError("grad_sq_norms: not used by mode='equal_norm' (it assumes equal norms); drop it")
        log_sq = torch.zeros_like(r)
    else:
        if sq is None:
            raise ValueError(f"grad_sq_norms: required for mode={mode!r}")
        if bool((sq < 0).any()) or not bool(torch.isfinite(sq).all()):
            raise ValueError("grad_sq_norms: expected finite values >= 0")
        log_sq = torch.log(sq)

    if mode == "reference_code":
        cap = REFERENCE_RATIO_CAP if ratio_cap is None else float(ratio_cap)
        clamped = log_rho.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).clamp(max=math.log(cap))
        log_w = 2.0 * clamped + 2.0 * log_rho + log_sq
    elif mode == "grad_norm":
        log_w = log_sq
    else:
        capped = log_rho if ratio_cap is None else log_rho.clamp(max=math.log(ratio_cap))
        log_w = 2.0 * capped + log_sq

    if length_normalized:
        lens = _per_sample(lengths, "lengths", n, dtype, device)
        if lens is None:
            raise ValueError("lengths: required with length_normalized=True")
        if not bool((lens > 0).all()):
            raise ValueError("lengths: expected values > 0")
        log_w = log_w - 2.0 * torch.log(lens)
    elif lengths is not None:
        raise ValueError("lengths: only used with length_normalized=True")

    if scope == "minibatch":
        return _minibatch_baseline(r, log_w, process_group)
    index, g = _group_index(group_ids, n, device)
    return _grouped_weighted_mean(r, log_w, index, g)


def _grouped_weighted_mean(r: torch.Tensor, log_w: torch.Tensor, index: torch.Tensor, g: int) -> torch.Tensor:
    """Σ W R / Σ W per group with W = exp(log_w − group max); the plain mean where Σ W = 0."""
    if r.numel() == 0:
        return r.clone()
    neg_inf = torch.full((g,), float("-inf"), dtype=r.dtype, device=r.device)
    group_max = neg_inf.scatter_reduce(0, index, log_w, reduce="amax", include_self=True)
    shift = group_max[index]
    w = torch.where(torch.isfinite(shift), torch.exp(log_w - shift), torch.zeros_like(r))
    zeros = torch.zeros(g, dtype=r.dtype, device=r.device)
    num = zeros.index_add(0, index, w * r)
    den = zeros.index_add(0, index, w)
    plain = zeros.index_add(0, index, r) / zeros.index_add(0, index, torch.ones_like(r)).clamp(min=1.0)
    per_group = torch.where(den > 0, num / den.clamp(min=torch.finfo(r.dtype).tiny), plain)
    return per_group[index]


def _minibatch_baseline(r: torch.Tensor, log_w: torch.Tensor, process_group: Any) -> torch.Tensor:
    local_max = log_w.max() if r.numel() else torch.tensor(float("-inf"), dtype=r.dtype, device=r.device)
    global_max = all_reduce_max(local_max, process_group)
    w = torch.exp(log_w - global_max) if bool(torch.isfinite(global_max)) else torch.zeros_like(r)
    sums = torch.stack([(w * r).sum(), w.sum(), r.sum(), torch.tensor(float(r.numel()), dtype=r.dtype)])
    sums = all_reduce_sum(sums, process_group)
    # No positive weight anywhere: the plain mean.
    value = sums[0] / sums[1] if float(sums[1]) > 0 else sums[2] / sums[3].clamp(min=1.0)
    return value.expand_as(r).clone()


# ---------------------------------------------------------------------- gradient squared norms
def per_sequence_grad_sq_norms(
    logprobs: torch.Tensor,
    params: Iterable[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact ‖∇_θ log π_θ(τ_i)‖² per sequence, one backward pass per sequence (B,).

    Args:
        logprobs: (B, T) per-token log π_θ with a graph to ``params`` (summed over valid tokens
            per sequence), or (B,) sequence log-probabilities.
        params: the parameters θ (those without a path to a sequence contribute 0).
        mask: (B, T) valid tokens (default: all).

    Cost: B backward passes through the shared graph (kept with ``retain_graph``); this is what
    the reference implementation does (micro-batch size 1). For large models use a proxy.
    """
    check_tensor("logprobs", logprobs, floating=True)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params: expected at least one tensor with requires_grad=True")
    if logprobs.dim() == 2:
        m = _mask_like(mask, logprobs, "logprobs")
        seq = masked_sum(logprobs, m, dim=-1)
    elif logprobs.dim() == 1:
        if mask is not None:
            raise ValueError("mask: only for (B, T) logprobs")
        seq = logprobs
    else:
        raise ValueError(f"logprobs: expected (B, T) or (B,), got shape {tuple(logprobs.shape)}")
    if not seq.requires_grad:
        raise ValueError("logprobs: has no autograd graph (requires_grad=False)")
    out = torch.zeros(seq.shape[0], dtype=compute_dtype(logprobs, *params), device=seq.device)
    for i in range(seq.shape[0]):
        grads = torch.autograd.grad(seq[i], params, retain_graph=True, allow_unused=True)
        out[i] = sum((g.detach().to(out.dtype).pow(2).sum() for g in grads if g is not None), out.new_zeros(()))
    return out


def logit_grad_sq_norms(
    logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Proxy: Σ_t ‖∂ log π(y_t) / ∂z_t‖² = Σ_t (1 − 2 p_t(y_t) + Σ_v p_t(v)²), from the logits z (B,).

    Exact squared norm of the gradient with respect to the per-position logits, no backward
    pass. As a proxy for the parameter gradient norm it ignores the Jacobian ∂z/∂θ and the
    correlation between positions (see the module docstring).

    Args:
        logits: (B, T, V) logits at the response positions (after temperature).
        token_ids: (B, T) sampled token ids.
        mask: (B, T) valid tokens (default: all).
    """
    check_tensor("logits", logits, floating=True)
    check_tensor("token_ids", token_ids, device=logits.device, what="the device of logits")
    if logits.dim() != 3 or tuple(token_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits / token_ids: expected (B, T, V) and (B, T), got {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids: expected an integer tensor, got dtype {token_ids.dtype}")
    if token_ids.numel() and not (int(token_ids.min()) >= 0 and int(token_ids.max()) < logits.shape[-1]):
        raise ValueError(
            f"token_ids: expected ids in [0, {logits.shape[-1]}) (the vocabulary of logits), "
            f"got [{int(token_ids.min())}, {int(token_ids.max())}]"
        )
    logp = torch.log_softmax(logits.detach().to(compute_dtype(logits)), dim=-1)
    p_y = torch.exp(logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1))
    sum_p_sq = torch.exp(torch.logsumexp(2.0 * logp, dim=-1))
    per_token = (1.0 - 2.0 * p_y + sum_p_sq).clamp(min=0.0)
    return masked_sum(per_token, _mask_like(mask, per_token, "token_ids"), dim=-1)


def length_grad_sq_norms(mask: torch.Tensor) -> torch.Tensor:
    """Proxy: ‖∇ log π(τ_i)‖² ≈ L_i, the number of valid tokens (B,) (see the module docstring)."""
    m = check_mask("mask", mask)
    if m.dim() != 2:
        raise ValueError(f"mask: expected a (B, T) tensor, got shape {tuple(m.shape)}")
    return m.sum(dim=-1).to(torch.float32)


def _mask_like(mask: torch.Tensor | None, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A (B, T) bool mask shaped like ``like`` (all valid when None), by `stable_async.checks.check_mask`."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return check_mask("mask", mask, shape=tuple(like.shape), device=like.device, what=f"like {like_name}")


class TokenBaselineResult(NamedTuple):
    """`optimal_token_baseline` output, each (B, T) and 0 at masked positions."""

    advantages: torch.Tensor
    returns: torch.Tensor
    baselines: torch.Tensor


def optimal_token_baseline(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    logprobs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
) -> TokenBaselineResult:
    """Optimal token baseline (veRL's ``optimal_token_baseline`` advantage estimator): one baseline per
    time step and prompt group, weighted by each trajectory's accumulated score-function energy.

    For trajectory i of a group, with reward-to-go G_{i,t} = Σ_{s≥t} m·r_{i,s}, p_{i,t} = π(a_t)
    (``logprobs``, the policy that sampled, veRL's ``old_log_probs``) and S_{i,t} = Σ_v π(v)²:

        w_{i,t} = (1 − 2 p_{i,t} + S_{i,t}) · ρ_{i,t}²      (= ‖e_{a_t} − π‖² ‖ρ‖², the squared norm of
                                                          the logit score; ρ = ``is_weights``, else 1)
        W_{i,t} = Σ_{s≤t} m·w_{i,s}                        (cumulative path variance)
        b_t     = Σ_i m_{i,t}·W_{i,t}·G_{i,t} / Σ_i m_{i,t}·W_{i,t}
        A_{i,t} = (G_{i,t} − b_t)·m_{i,t}

    the minimum-variance constant baseline at step t for the per-step gradient term whose squared
    norm grows like W (an approximation: a path's gradient norms are treated as uncorrelated).
    A group of one gets b = 0 (A = G), as in veRL. ``handle_zero_tail`` (veRL's default True):
    when one trajectory is strictly the longest of its group, its baseline is 0 from the length of
    the second longest on (no other trajectory to compare with there).

    Differences from veRL (``compute_optimal_token_baseline_advantage``, veRL 0.9.1): veRL divides
    by Σ W + 1e-8; here by Σ W, and a step whose Σ W is 0 (a deterministic policy) gets the plain
    mean of the valid returns instead of veRL's 0/1e-8 = 0 — equal otherwise up to a relative
    1e-8/Σ W. ``sum_pi_squared`` comes from the logits (``torch.exp(torch.logsumexp(2 ·
    log_softmax(z), -1))``, see `logit_grad_sq_norms`).

    Args:
        token_rewards: (B, T) per-token rewards (an outcome reward sits at the last valid token).
        mask: (B, T) valid response tokens.
        logprobs: (B, T) log-prob of each sampled token under the sampling policy.
        sum_pi_squared: (B, T) Σ_v π(v)² at each position.
        group_ids: (B,) prompt-group ids; None: one group.
        is_weights: (B, T) optional (truncated) IS weights ρ.
        handle_zero_tail: see above.
    """
    r = token_rewards.detach().to(compute_dtype(token_rewards, logprobs))
    if r.dim() != 2:
        raise ValueError(f"token_rewards: expected a 2-D tensor (B, T), got shape {tuple(r.shape)}")
    B, T = r.shape
    tensors = {"mask": mask, "logprobs": logprobs, "sum_pi_squared": sum_pi_squared, "is_weights": is_weights}
    for name, value in tensors.items():
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (B, T)):
            raise ValueError(f"{name}: expected a tensor of shape ({B}, {T}) like token_rewards")
    m = check_mask("mask", mask, shape=(B, T), device=r.device)
    mf = m.to(r.dtype)
    values = [r, logprobs.detach().to(r.dtype), sum_pi_squared.detach().to(r.dtype)]
    if is_weights is not None:
        values.append(is_weights.detach().to(r.dtype))
    if not all(bool(torch.isfinite(v[m]).all()) for v in values):
        raise ValueError("token_rewards / logprobs / sum_pi_squared / is_weights: found NaN/inf at a valid position")
    returns = (r * mf).flip(-1).cumsum(-1).flip(-1)
    w = 1.0 - 2.0 * torch.exp(values[1]) + values[2]
    if is_weights is not None:
        w = w * values[3].square()
    cum_w = (w * mf).cumsum(-1)
    index, g = _group_index(group_ids, B, r.device)
    num = torch.zeros(g, T, dtype=r.dtype, device=r.device).index_add_(0, index, returns * cum_w * mf)
    den = torch.zeros(g, T, dtype=r.dtype, device=r.device).index_add_(0, index, cum_w * mf)
    ret_sum = torch.zeros(g, T, dtype=r.dtype, device=r.device).index_add_(0, index, returns * mf)
    count = torch.zeros(g, T, dtype=r.dtype, device=r.device).index_add_(0, index, mf)
    plain = ret_sum / count.clamp(min=1.0)
    per_step = torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), plain)
    group_size = torch.zeros(g, dtype=torch.long, device=r.device).index_add_(0, index, torch.ones_like(index))
    baselines = torch.where((group_size[index] > 1)[:, None], per_step[index], torch.zeros_like(r))
    if handle_zero_tail:
        lengths = m.sum(-1)
        for group in range(g):
            members = (index == group).nonzero()[:, 0]
            if len(members) < 2:
                continue
            top2 = lengths[members].topk(2).values
            longest = members[lengths[members] == top2[0]]
            if len(longest) == 1 and top2[0] > top2[1]:
                baselines[longest[0], int(top2[1]) :] = 0.0
    baselines = baselines * mf
    return TokenBaselineResult(advantages=(returns - baselines) * mf, returns=returns * mf, baselines=baselines)
