import stable_async as sa
from sa_testing import random_tensors


def test_every_registered_loss_runs_and_backpropagates(gen):
    t = random_tensors(gen)
    batch = sa.PolicyBatch(**t)
    for name in sa.available_losses():
        out = sa.get_loss(name)(batch)
        (grad,) = __import__("torch").autograd.grad(out.loss, t["logprobs"], allow_unused=True)
        assert out.loss.dim() == 0
        assert grad is not None and grad.isfinite().all(), name
