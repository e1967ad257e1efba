"""Shared fixtures; helpers live in ``sa_testing`` (tests/ is on sys.path via pytest's ``pythonpath``)."""

from __future__ import annotations

import os

import pytest
import torch

from sa_testing import random_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tensors(gen):
    """Random fp64 policy tensors (see ``sa_testing.random_tensors``)."""
    return random_tensors(gen)
