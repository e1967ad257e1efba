"""PolicyBatch validation: every bad input names the argument and the expectation."""

import pytest
import torch

import stable_async as sa
from stable_async import BatchValidationError


def _base(B=2, T=3, dtype=torch.float32):
    return {
        "logprobs": -torch.rand(B, T, dtype=dtype),
        "advantages": torch.randn(B, dtype=dtype),
        "mask": torch.ones(B, T, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"logprobs": -torch.rand(2, 3, 4)}, r"logprobs: expected a 2-D tensor \(B, T\)"),
        ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, r"logprobs: expected a floating dtype"),
        ({"logprobs": [[0.0]]}, r"logprobs: expected a torch.Tensor, got list"),
        ({"mask": torch.ones(2, 4)}, r"mask: expected shape \(2, 3\)"),
        ({"mask": torch.full((2, 3), 2.0)}, r"mask: expected bool or 0/1 values"),
        ({"advantages": torch.randn(3)}, r"advantages: expected shape \(2,\)"),
        ({"advantages": torch.randn(2, 4)}, r"advantages: expected shape \(2, 3\)"),
        ({"advantages": torch.zeros(2, dtype=torch.long)}, r"advantages: expected a floating dtype"),
        ({"old_logprobs": torch.zeros(3, 3)}, r"old_logprobs: expected shape \(2, 3\)"),
        ({"rollout_logprobs": torch.zeros(2, 2)}, r"rollout_logprobs: expected shape \(2, 3\)"),
        ({"rewards": torch.zeros(5)}, r"rewards: expected shape \(2,\)"),
        ({"group_ids": torch.zeros(2)}, r"group_ids: expected an integer dtype"),
        ({"versions": torch.zeros(2, dtype=torch.long)}, r"current_version: required when versions is given"),
        ({"topk_ids": torch.zeros(2, 3, dtype=torch.long)}, r"topk_ids: expected shape \(2, 3, K\)"),
        (
            {"topk_ids": torch.zeros(2, 3, 4, dtype=torch.long), "topk_logprobs": torch.zeros(2, 3, 5)},
            r"topk_logprobs: expected K=4",
        ),
        ({"dp_size": 0}, r"dp_size: expected a positive integer"),
        ({"global_num_tokens": -1}, r"global_num_tokens: expected a count >= 0"),
        ({"mask": torch.ones(2, 3, device="meta")}, r"mask: expected device cpu"),
        ({"old_logprobs": torch.zeros(2, 3, device="meta")}, r"old_logprobs: expected device cpu"),
    ],
)
def test_bad_input_names_the_argument(changes, pattern):
    kwargs = _base()
    kwargs.update(changes)
    with pytest.raises(BatchValidationError, match=pattern):
        sa.PolicyBatch(**kwargs)


def test_nan_or_inf_at_a_valid_position_is_an_error():
    kwargs = _base()
    kwargs["logprobs"] = kwargs["logprobs"].clone()
    kwargs["logprobs"][1, 2] = float("nan")
    with pytest.raises(BatchValidationError, match=r"logprobs: 1 NaN/inf value\(s\) at valid"):
        sa.PolicyBatch(**kwargs)
    kwargs = _base()
    kwargs["rollout_logprobs"] = torch.full((2, 3), float("-inf"))
    with pytest.raises(BatchValidationError, match=r"rollout_logprobs: 6 NaN/inf"):
        sa.PolicyBatch(**kwargs)


def test_nonfinite_values_at_masked_positions_are_zeroed():
    kwargs = _base()
    kwargs["mask"] = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lp = kwargs["logprobs"].clone()
    lp[0, 2], lp[1, 1], lp[1, 2] = float("-inf"), float("nan"), float("inf")
    kwargs["logprobs"] = lp
    batch = sa.PolicyBatch(**kwargs)
    assert torch.isfinite(batch.logprobs).all()
    assert batch.logprobs[0, 2] == 0 and batch.logprobs[1, 1] == 0
    assert batch.mask.dtype == torch.bool


def test_defaults_broadcasting_and_compute_dtype():
    kwargs = _base(dtype=torch.bfloat16)
    batch = sa.PolicyBatch(**kwargs)
    assert batch.dtype == torch.float32
    assert batch.logprobs.dtype == torch.float32
    assert batch.advantages.shape == (2, 3)
    assert torch.equal(batch.advantages[:, 0], batch.advantages[:, 2])
    assert torch.equal(batch.old_logprobs, batch.logprobs.detach())
    assert torch.equal(batch.behavior_logprobs, batch.old_logprobs)
    assert sa.PolicyBatch(**_base(dtype=torch.float64)).dtype == torch.float64


def test_sequence_advantages_is_the_masked_token_mean():
    batch = sa.PolicyBatch(
        logprobs=-torch.rand(2, 3),
        advantages=torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]]),
        mask=torch.tensor([[1, 1, 0], [1, 0, 0]]),
    )
    assert torch.allclose(batch.sequence_advantages, torch.tensor([1.5, 4.0]))


def test_batch_is_reusable_for_several_backward_passes():
    lp = (-torch.rand(2, 3)).requires_grad_(True)
    batch = sa.PolicyBatch(logprobs=lp, advantages=torch.randn(2), mask=torch.ones(2, 3))
    for name in ("ppo", "reinforce"):
        sa.get_loss(name)(batch).loss.backward()
    assert lp.grad is not None


def test_with_global_counts_without_distributed_is_local():
    kwargs = _base()
    kwargs["mask"] = torch.tensor([[1, 1, 0], [0, 0, 0]])
    batch = sa.PolicyBatch(**kwargs).with_global_counts()
    assert (batch.global_num_tokens, batch.global_num_seqs, batch.dp_size) == (2.0, 1.0, 1)


def test_empty_batch_is_valid():
    batch = sa.PolicyBatch(logprobs=torch.zeros(0, 0), advantages=torch.zeros(0), mask=torch.zeros(0, 0))
    assert batch.batch_size == 0


def test_require_returns_the_field_or_names_it_and_its_user():
    batch = sa.PolicyBatch(**_base(), rollout_logprobs=-torch.rand(2, 3))
    assert batch.require("rollout_logprobs", "x") is batch.rollout_logprobs
    assert batch.require("old_logprobs", "x") is batch.old_logprobs
    with pytest.raises(BatchValidationError, match=r"^topk_logprobs: required by my_loss\(k=4\)$"):
        sa.PolicyBatch(**_base()).require("topk_logprobs", "my_loss(k=4)")


def test_finite_values_whose_sum_overflows_are_kept_as_given():
    # Every value finite, but their sum is inf in fp32: the screen is on min and max, not the sum.
    kwargs = _base()
    kwargs["advantages"] = torch.full((2, 3), 3e38)
    batch = sa.PolicyBatch(**kwargs)
    assert batch.advantages is kwargs["advantages"]
    kwargs["advantages"] = kwargs["advantages"].clone()
    kwargs["advantages"][0, 1] = float("inf")
    with pytest.raises(BatchValidationError, match=r"advantages: 1 NaN/inf value\(s\) at valid"):
        sa.PolicyBatch(**kwargs)


def test_counts_and_float_mask_match_a_direct_count():
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    mask[2] = False
    batch = sa.PolicyBatch(logprobs=-torch.rand(5, 7), advantages=torch.randn(5), mask=mask)
    assert batch.num_valid.dtype == torch.int32 and int(batch.num_valid) == int(mask.sum())
    assert torch.equal(batch.maskf, mask.to(torch.float32))
    rows_with_a_token = int(mask.any(dim=-1).sum())
    sa.PolicyBatch(logprobs=-torch.rand(5, 7), advantages=torch.randn(5), mask=mask, global_num_seqs=rows_with_a_token)
    with pytest.raises(BatchValidationError, match=r"global_num_seqs: expected a global count >= the local count 4"):
        sa.PolicyBatch(
            logprobs=-torch.rand(5, 7), advantages=torch.randn(5), mask=mask, global_num_seqs=rows_with_a_token - 1
        )


def test_replace_revalidates_and_keeps_the_other_fields():
    old = -torch.rand(2, 3)
    batch = sa.PolicyBatch(**_base(), old_logprobs=old, current_version=3)
    changed = batch.replace(advantages=torch.ones(2))
    assert torch.equal(changed.old_logprobs, old) and changed.current_version == 3
    assert torch.equal(changed.advantages, torch.ones(2, 3))
    with pytest.raises(ValueError, match="dtype"):
        batch.replace(dtype=torch.float64)  # derived, not a constructor argument
