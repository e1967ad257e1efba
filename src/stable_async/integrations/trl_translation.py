"""TRL's names and settings in stable-async terms (no trainer state, no TRL import).

What `StableGRPOTrainer` reads from a ``GRPOConfig`` and from TRL's batch, and what it writes back
under TRL's names:

* `trl_equivalent_loss`: the registered loss reproducing ``loss_type`` / ε / δ / the ratio level;
* `trl_is_correction`: TRL's vLLM importance-sampling mode as a `RolloutCorrection`;
* `step_denominators`: TRL's gradient-accumulation scaling as global counts of the optimizer step;
* `clip_flags`: TRL's ``clip_ratio/*`` indicators (which tokens TRL counts as clipped);
* `metric_name`: our metric names under TRL's logger (``stable_async/`` prefix);
* `pad_topk`: a ``rollout_func``'s per-token top-K lists as (B, T, K) tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stable_async.correction import RolloutCorrection

__all__ = [
    "PREFIX",
    "TOPK_IDS_KEY",
    "TOPK_KEYS",
    "TOPK_LOGPROBS_KEY",
    "clip_flags",
    "metric_name",
    "pad_topk",
    "step_denominators",
    "trl_equivalent_loss",
    "trl_is_correction",
]

#: ``rollout_func`` output keys for the top-K losses: per completion, one list of K token ids
#: (resp. K sampler log-probs, after temperature like ``logprobs``) per completion token.
TOPK_IDS_KEY = "topk_ids"
TOPK_LOGPROBS_KEY = "topk_logprobs"
TOPK_KEYS = (TOPK_IDS_KEY, TOPK_LOGPROBS_KEY)
#: Prefix of our metrics in TRL's logs (TRL's own names are kept where TRL logs the quantity).
PREFIX = "stable_async/"
# The Trainer already logs the step's ``loss``.
_DROPPED_METRICS = frozenset({"actor/pg_loss"})

_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
}


def trl_equivalent_loss(args: Any) -> tuple[str, dict[str, Any], str]:
    """The stable-async loss that reproduces a ``GRPOConfig``'s built-in loss.

    Returns ``(name, hyperparameters, token_normalizer)``. Mapping (TRL → stable-async):
    ``grpo`` → ``ppo`` + ``seq-mean-token-mean``; ``bnpo`` → ``ppo`` + ``token-mean`` with the
    micro-batch's token count (``"local"``); ``dr_grpo`` → ``ppo`` + ``seq-mean-token-sum-norm``
    with ``norm_length = max_completion_length``; ``dapo`` → ``ppo`` + ``token-mean`` over the
    step (``"global"``); ``cispo`` → ``cispo`` with ``eps_low=1``, ``eps_high=epsilon_high − 1``;
    ``sapo`` → ``sapo`` (τ from ``sapo_temperature_pos/neg``). ``delta`` → ``ratio_cap``;
    ``importance_sampling_level="sequence"`` → ``gspo`` with the same aggregation.
    ``luspo`` and ``vespo`` have no equivalent (``ValueError``).
    """
    loss_type = args.loss_type
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    aggregation = _AGGREGATION.get(loss_type)
    if aggregation is None:
        raise ValueError(
            f"policy_loss: TRL's loss_type={loss_type!r} has no stable-async equivalent; pass policy_loss= "
            "(a registered name or a Loss) to StableGRPOTrainer"
        )
    settings: dict[str, Any] = {"aggregation": aggregation}
    if loss_type == "dr_grpo":
        settings["norm_length"] = float(args.max_completion_length)
    normalizer = "local" if loss_type == "bnpo" else "global"
    if loss_type == "cispo":
        return "cispo", {**settings, "eps_low": 1.0, "eps_high": args.epsilon_high - 1.0}, normalizer
    if loss_type == "sapo":
        settings.update(tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
        return "sapo", settings, normalizer
    if args.importance_sampling_level == "sequence":
        if args.delta is not None:
            raise ValueError("delta: two-sided clipping with importance_sampling_level='sequence' has no equivalent")
        return "gspo", {**settings, "eps_low": eps_low, "eps_high": eps_high}, normalizer
    return "ppo", {**settings, "eps_low": eps_low, "eps_high": eps_high, "ratio_cap": args.delta}, normalizer


def trl_is_correction(mode: str, low: float, high: float) -> RolloutCorrection:
    """TRL's ``vllm_importance_sampling_mode`` (``{token,sequence}_{truncate,mask}``) and clip bounds."""
    level, how = mode.split("_")
    return RolloutCorrection(level=level, mode=how, low=low, high=high)


def step_denominators(
    *,
    normalizer: str,
    num_items_in_batch: float,
    valid_tokens: float,
    rows: int,
    accumulation: int,
    steps_per_generation: int,
    processes: int,
    training: bool,
) -> tuple[float, float]:
    """``(global_num_tokens, global_num_seqs)`` that scale a micro-batch's loss as TRL's is scaled.

    TRL's loss is already divided for gradient accumulation (``loss_is_scaled_for_ga``); the same
    scaling is reached with denominators that count the whole optimizer step over all ranks:
    ``"global"`` tokens = ``num_items_in_batch · GA / steps_per_generation`` (TRL's ``dapo``
    normalizer: ``num_items_in_batch`` counts a whole generation batch), ``"local"`` tokens = the
    micro-batch's valid tokens · GA · processes (TRL's ``bnpo``); sequences = rows · GA · processes
    (TRL's ``grpo`` divides by every row, masked or not). In evaluation GA is 1 and
    ``num_items_in_batch`` already counts the evaluated batch.
    """
    accumulation = accumulation if training else 1
    if normalizer == "global":
        tokens = float(num_items_in_batch)
        if training:
            tokens = tokens * accumulation / steps_per_generation
    else:
        tokens = float(valid_tokens) * accumulation * processes
    return tokens, float(rows * accumulation * processes)


def clip_flags(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    level: str,
    ratio_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``is_low_clipped`` and ``is_high_clipped`` (its ``clip_ratio/*`` metrics), as TRL forms them.

    With r = exp(log π_θ − log π_old) per token (``level="token"``, shape (B, T)) or
    exp of its masked mean per sequence (``"sequence"``, shape (B, 1)), capped at ``ratio_cap``
    (TRL's ``delta``) when given: low = r < 1 − ε_low and A < 0; high = r > 1 + ε_high and A > 0.
    ``advantages`` is one value per sequence (B,), as in TRL's batch.
    """
    if level == "sequence":
        counts = mask.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / counts
    ratio = torch.exp(log_ratio)
    if ratio_cap is not None:
        ratio = ratio.clamp(max=ratio_cap)
    adv = advantages.reshape(-1, 1)
    return (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def metric_name(name: str) -> str | None:
    """Our metric's name in TRL's logs (``None``: not logged, the Trainer logs it itself)."""
    if name in _DROPPED_METRICS:
        return None
    return name if name.startswith(PREFIX) else PREFIX + name


def pad_topk(completions: list[Any], ids: Any, logprobs: Any, completion_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``rollout_func``'s per-token top-K lists as (B, T, K) tensors aligned with ``completion_ids``.

    Padding positions hold id 0 and log-prob 0 (masked by the loss); a ``None`` log-prob becomes NaN.
    """
    for key, value in ((TOPK_IDS_KEY, ids), (TOPK_LOGPROBS_KEY, logprobs)):
        if not isinstance(value, (list, tuple)) or len(value) != len(completions):
            raise ValueError(
                f"rollout_func: {key!r} must be a list with one entry per completion ({len(completions)}) when "
                f"{list(TOPK_KEYS)} are returned, got {type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else "")
            )
    rows, length = completion_ids.shape
    k = next((len(tok) for row in ids for tok in row), 0)
    out_ids = torch.zeros(rows, length, k, dtype=torch.long)
    out_lps = torch.zeros(rows, length, k, dtype=torch.float32)
    for i, (completion, row_ids, row_lps) in enumerate(zip(completions, ids, logprobs, strict=True)):
        n = len(completion)
        if len(row_ids) != n or len(row_lps) != n:
            raise ValueError(
                f"rollout_func: completion {i} has {n} tokens but {len(row_ids)} {TOPK_IDS_KEY!r} and "
                f"{len(row_lps)} {TOPK_LOGPROBS_KEY!r} entries (one list of K per completion token)"
            )
        if not n:
            continue
        if any(len(tok) != k for tok in row_ids) or any(len(tok) != k for tok in row_lps):
            raise ValueError(f"rollout_func: every token's top-K must have the same K={k} ids and log-probs")
        out_ids[i, :n] = torch.as_tensor(row_ids, dtype=torch.long)
        out_lps[i, :n] = torch.tensor([[math.nan if x is None else float(x) for x in tok] for tok in row_lps])
    return {TOPK_IDS_KEY: out_ids.to(completion_ids.device), TOPK_LOGPROBS_KEY: out_lps.to(completion_ids.device)}
