"""A loop with ESSScaledLR, GradientAlignmentControl and a LambdaLR schedule resumes exactly.

Train 8 steps straight; separately train 4 steps, save every state_dict (model, wrapped
optimizer, scheduler, GAC), rebuild everything from scratch, load, train 4 more. The final
parameters must be bit-identical.
"""

import io

import torch

import stable_async as sa


def _build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    optimizer = sa.ESSScaledLR(torch.optim.Adam(model.parameters(), lr=0.01), rule="sqrt")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    gac = sa.GradientAlignmentControl(model.parameters(), mode="project", threshold=0.1, strength=0.5)
    return model, optimizer, scheduler, gac


def _step(step, model, optimizer, scheduler, gac):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(12, 6, generator=gen)
    actions = torch.randint(0, 5, (12, 1), generator=gen)
    logprobs = torch.log_softmax(model(x), -1).gather(-1, actions)
    rollout = logprobs.detach() + 0.3 * torch.randn(12, 1, generator=gen)
    batch = sa.PolicyBatch(
        logprobs=logprobs, advantages=torch.randn(12, generator=gen), mask=torch.ones(12, 1), rollout_logprobs=rollout
    )
    loss = sa.get_loss("vcpo")(batch).loss
    optimizer.zero_grad()
    loss.backward()
    metrics = gac.apply()
    ess = sa.effective_sample_size(logprobs.detach() - rollout)
    optimizer.step(ess.ess_ratio)
    scheduler.step()
    return metrics["gac/action"], optimizer.last_metrics["vcpo/lr_scale"]


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_resumed_run_equals_uninterrupted_run():
    straight = _build()
    trace = [_step(step, *straight) for step in range(8)]
    assert any(action == 1 for action, _ in trace[4:]), "GAC should project after the checkpoint"
    assert any(scale < 1 for _, scale in trace[4:]), "the ESS scale should be active after the checkpoint"

    first = _build()
    for step in range(4):
        _step(step, *first)
    model, optimizer, scheduler, gac = first
    saved = _roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "gac": gac.state_dict(),
        }
    )
    resumed = _build()
    model, optimizer, scheduler, gac = resumed
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    gac.load_state_dict(saved["gac"])
    for step in range(4, 8):
        _step(step, *resumed)

    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert straight[1].last_metrics == resumed[1].last_metrics
    assert straight[3].state_dict()["step"] == resumed[3].state_dict()["step"]
