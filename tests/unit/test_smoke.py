"""Every registered loss runs on a fully populated batch and backpropagates finite gradients."""

import torch

import stable_async as sa
from sa_testing import full_batch_kwargs


def test_every_registered_loss_runs_and_backpropagates(gen):
    kwargs = full_batch_kwargs(gen)
    batch = sa.PolicyBatch(**kwargs)
    for name in sa.available_losses():
        out = sa.get_loss(name)(batch)
        leaves = [kwargs["logprobs"], kwargs["current_topk_logprobs"]]
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        assert out.loss.dim() == 0, name
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        assert all(g is None or g.isfinite().all() for g in grads), name
