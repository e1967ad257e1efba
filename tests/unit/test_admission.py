"""`admission_mask` / `staleness`: hand-computed masks, broadcasting, dtypes and bad inputs."""

from __future__ import annotations

import pytest
import torch

import stable_async as sa
from stable_async.admission import staleness


def test_sequence_versions_hand_computed():
    versions = torch.tensor([9, 7, 6, 10, 3])  # staleness at t = 10: 1, 3, 4, 0, 7
    assert staleness(versions, 10).tolist() == [1, 3, 4, 0, 7]
    assert sa.admission_mask(versions, 10, 0).tolist() == [False, False, False, True, False]
    assert sa.admission_mask(versions, 10, 3).tolist() == [True, True, False, True, False]
    assert sa.admission_mask(versions, 10, 7).tolist() == [True] * 5


def test_a_sequence_version_clears_every_token_of_its_row_and_keeps_the_mask_dtype():
    versions = torch.tensor([5, 2, 4])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    out = sa.admission_mask(versions, 5, 2, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    as_bool = sa.admission_mask(versions, 5, 2, mask.bool())
    assert as_bool.dtype == torch.bool and torch.equal(as_bool, out.bool())
    as_int = sa.admission_mask(versions, 5, 2, mask.long())
    assert as_int.dtype == torch.int64 and torch.equal(as_int, out.long())


def test_token_versions_are_checked_only_where_the_mask_is_set():
    # AReaL's per-token versions: -1 on prompt tokens (mask 0); a partial rollout spans 3 and 5.
    versions = torch.tensor([[-1, -1, 5, 5], [-1, 3, 3, 5], [-1, -1, 2, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    out = sa.admission_mask(versions, 5, 1, mask)
    assert out.tolist() == [
        [False, False, True, True],
        [False, False, False, True],  # tokens of version 3 are 2 behind
        [False, False, False, False],
    ]
    with pytest.raises(ValueError, match=r"^versions: expected versions <= current_version=5, got a version 9"):
        sa.admission_mask(versions, 5, 1)  # without the mask the 9 (and the -1) count


def test_empty_and_fully_masked_batches():
    assert sa.admission_mask(torch.zeros(0, dtype=torch.long), 3, 1).shape == (0,)
    assert sa.admission_mask(torch.zeros(0, dtype=torch.long), 3, 1, torch.zeros(0, 4)).shape == (0, 4)
    versions = torch.tensor([7, -1])
    out = sa.admission_mask(versions, 2, 0, torch.zeros(2, 3, dtype=torch.bool))
    assert not out.any()


def test_against_brute_force(gen):
    versions = torch.randint(0, 21, (64,), generator=gen)
    mask = torch.rand(64, 5, generator=gen) < 0.7
    for bound in (0, 1, 4, 20):
        out = sa.admission_mask(versions, 20, bound, mask)
        for i in range(64):
            for j in range(5):
                assert bool(out[i, j]) == (bool(mask[i, j]) and 20 - int(versions[i]) <= bound)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bound": -1}, ValueError, r"^bound: expected an integer >= 0, got -1"),
        ({"bound": 1.0}, TypeError, r"^bound: expected an int"),
        ({"bound": True}, TypeError, r"^bound: expected an int"),
        ({"current_version": "3"}, TypeError, r"^current_version: expected an int"),
        ({"current_version": -2}, ValueError, r"^current_version: expected an integer >= 0"),
        ({"versions": torch.tensor([1.0, 2.0])}, TypeError, r"^versions: expected an integer tensor"),
        ({"versions": torch.tensor([True, False])}, TypeError, r"^versions: expected an integer tensor"),
        ({"versions": [1, 2]}, TypeError, r"^versions: expected a torch.Tensor"),
        ({"versions": torch.tensor([1, 6])}, ValueError, r"^versions: expected versions <= current_version=5"),
        ({"versions": torch.tensor([1, -1])}, ValueError, r"^versions: expected versions >= 0, got a version -1"),
        ({"mask": torch.ones(3, 2)}, ValueError, r"^versions: expected shape \(3, 2\) or a leading part of it"),
        ({"mask": torch.full((2, 2), 0.5)}, ValueError, r"^mask: expected bool or 0/1 values"),
        ({"mask": torch.ones(2, 2, device="meta")}, ValueError, r"^mask: expected a tensor with data"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, message):
    args = {"versions": torch.tensor([4, 5]), "current_version": 5, "bound": 1, "mask": None} | kwargs
    with pytest.raises(error, match=message):
        sa.admission_mask(**args)
