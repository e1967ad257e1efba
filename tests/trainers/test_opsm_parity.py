"""OPSM (``sa.opsm``) against TRL's ``off_policy_mask_threshold``, in fp64, values and gradients.

The reference is TRL's own ``GRPOTrainer._compute_loss`` (driven by `trl_compute_loss_fp64` on
the same fp64 log-probs). Its IS ratio is an input of ``_compute_loss`` (TRL forms it while
scoring completions); the chained case builds it with TRL's formula for ``sequence_mask``.
"""

import pytest
import torch

import stable_async as sa
from trl_helpers import trl_compute_loss_fp64, trl_inputs

pytestmark = pytest.mark.trainers
trl = pytest.importorskip("trl")

B, T = 8, 7


def _case(seed, per_token_adv=False):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[0] = False  # an empty row
    lp = (-0.2 - 2.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    # Old and engine log-probs above the trainer's by a per-sequence amount: a spread of KLs.
    shift = torch.linspace(-0.3, 1.2, B, dtype=torch.float64)[:, None]
    old = (lp.detach() + shift + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    mu = (old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    adv[1] = 0.0  # A = 0 is kept by TRL
    return lp, old, torch.where(mask, mu, 0.0), adv, mask


def _grad(loss, lp):
    return torch.autograd.grad(loss, lp)[0]


@pytest.mark.parametrize("with_rollout", [True, False])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_opsm_matches_trl(with_rollout, per_token_adv, threshold):
    lp, old, mu, adv, mask = _case(1, per_token_adv)
    inputs = trl_inputs(mask, adv, old, mu if with_rollout else None)
    ref, _ = trl_compute_loss_fp64(lp, inputs, loss_type="dapo", off_policy_mask_threshold=threshold)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=adv,
        mask=mask,
        old_logprobs=old,
        rollout_logprobs=mu if with_rollout else None,
        global_num_tokens=float(mask.sum()),
    )
    out = sa.get_loss("ppo", correction=sa.opsm(threshold))(batch)
    masked = out.metrics["opsm/seq_masked_fraction"]
    assert 0.0 < masked < 1.0  # the case exercises both branches
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(out.loss, lp), _grad(ref, lp), rtol=1e-12, atol=1e-14)


def test_opsm_with_trl_sequence_mask_is_matches_trl():
    lp, old, mu, adv, mask = _case(2)
    mu[2:4] -= 0.5 * mask[2:4]  # two sequences with π_old/μ far above 3: rejected by the IS mask
    clip_max = 3.0
    # TRL's sequence_mask IS ratio (``_generate_and_score_completions``): exp(Σ m·(old − μ)), 0 above C.
    ratio = torch.exp(((old - mu) * mask).sum(-1, keepdim=True))
    ratio = ratio.masked_fill(ratio > clip_max, 0.0)
    inputs = trl_inputs(mask, adv, old, mu, ratio)
    ref, _ = trl_compute_loss_fp64(
        lp, inputs, loss_type="grpo", off_policy_mask_threshold=0.4, use_vllm=True,
        vllm_importance_sampling_correction=True,
    )  # fmt: skip
    batch = sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, old_logprobs=old, rollout_logprobs=mu)
    correction = (sa.sequence_mask(high=clip_max), sa.opsm(0.4))
    out = sa.get_loss("ppo", aggregation="seq-mean-token-mean", correction=correction)(batch)
    assert 0.0 < out.metrics["opsm/seq_masked_fraction"] < 1.0
    assert out.metrics["rollout_corr/rollout_rs_seq_masked_fraction"] > 0.0
    # TRL divides every row by its length clamped at 1 and averages over all rows (the empty one too).
    scale = (mask.any(-1).sum() / B).double()
    torch.testing.assert_close(out.loss * scale, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(out.loss * scale, lp), _grad(ref, lp), rtol=1e-12, atol=1e-14)
