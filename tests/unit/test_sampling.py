"""`sampling_logprobs` against a brute-force reference and autograd.

The reference enumerates the vocabulary of each row and applies vLLM's filters one after the
other, in the documented order and in vLLM's own terms: temperature, then min-p on the
probabilities, then top-k (ties with the k-th value kept), then top-p on the renormalized
survivors sorted ascending (a stable sort, so a tie at the cut-off is split by index), then a
softmax over what is left.
"""

import math

import pytest
import torch

import stable_async as sa


def _reference_row(z, temperature, top_k, top_p, min_p):
    """(alive: list[bool], log normalizer) for one row, by enumeration."""
    z = [float(x) / temperature for x in z]
    V = len(z)
    alive = [True] * V
    if min_p:
        m = max(z)
        total = sum(math.exp(x - m) for x in z)
        probs = [math.exp(x - m) / total for x in z]
        alive = [a and p >= min_p * max(probs) for a, p in zip(alive, probs)]
    if top_k:
        values = sorted((x if a else -math.inf for x, a in zip(z, alive)), reverse=True)
        kth = values[min(top_k, V) - 1]
        alive = [a and x >= kth for a, x in zip(alive, z)]
    if top_p:
        order = sorted((i for i in range(V) if alive[i]), key=lambda i: (z[i], i))
        mass = sum(math.exp(z[i]) for i in order)
        cumulative = 0.0
        for pos, i in enumerate(order):
            cumulative += math.exp(z[i]) / mass
            if cumulative <= 1 - top_p and pos != len(order) - 1:
                alive[i] = False
    log_norm = math.log(sum(math.exp(x) for x, a in zip(z, alive) if a))
    return alive, log_norm, z


def _reference(logits, ids, temperature=1.0, top_k=None, top_p=None, min_p=None):
    out = []
    for row, i in zip(logits.reshape(-1, logits.shape[-1]).tolist(), ids.reshape(-1).tolist()):
        alive, log_norm, z = _reference_row(row, temperature, top_k, top_p, min_p)
        # Documented rule: a token tied with the smallest survivor counts as kept.
        smallest = min(x for x, a in zip(z, alive) if a)
        out.append(z[i] - log_norm if alive[i] or z[i] == smallest else -math.inf)
    return torch.tensor(out, dtype=torch.float64).reshape(ids.shape)


SETTINGS = [
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"temperature": 1.3, "top_k": 8, "top_p": 0.9},
    {"temperature": 0.6, "min_p": 0.05, "top_p": 0.7},
    {"temperature": 0.9, "min_p": 0.02, "top_k": 6, "top_p": 0.95},
    {"top_k": 1},
    {"top_p": 1e-6},  # only the largest token survives
    {"top_k": 40, "top_p": 0.5},  # k >= V
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_matches_brute_force(settings):
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(3, 4, 32, generator=gen, dtype=torch.float64)
    for ids in (torch.randint(0, 32, (3, 4), generator=gen), logits.argmax(-1)):
        ours = sa.sampling_logprobs(logits, ids, **settings)
        torch.testing.assert_close(ours, _reference(logits, ids, **settings), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(ours[ids == logits.argmax(-1)]).all()  # the mode always survives


def test_every_id_of_a_row_and_normalization():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    settings = {"temperature": 0.8, "top_k": 20, "top_p": 0.85, "min_p": 0.01}
    all_ids = torch.arange(50).expand(2, 50)
    rows = logits[:, None, :].expand(2, 50, 50)
    ours = sa.sampling_logprobs(rows, all_ids, **settings)
    torch.testing.assert_close(ours, _reference(rows, all_ids, **settings), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(2, dtype=torch.float64))  # a distribution
    assert (ours == -math.inf).any(-1).all()


def test_ties_at_the_cut_offs():
    # top-k = 2 with three tokens tied at the 2nd value: all three are kept.
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    ours = sa.sampling_logprobs(logits.expand(5, 5), torch.arange(5), top_k=2)
    torch.testing.assert_close(ours, _reference(logits.expand(5, 5), torch.arange(5), top_k=2))
    assert torch.isfinite(ours[:4]).all() and ours[4] == -math.inf
    # top-p cutting inside a tie of four equal tokens: vLLM drops two of them (which two depends on
    # its sort); the normalizer counts two, and each of the four is reported as kept.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 3.0]], dtype=torch.float64)
    ids = torch.arange(6)
    ours = sa.sampling_logprobs(logits.expand(6, 6), ids, top_p=0.92)
    log_norm = math.log(2 + math.exp(2.0) + math.exp(3.0))
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 3.0], dtype=torch.float64) - log_norm
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ours, _reference(logits.expand(6, 6), ids, top_p=0.92))
    # The same with top-k: k = 6 sorts only the top-k values; k = 3 and 5 cut inside the tie (all
    # tied tokens kept, more than k survivors: the full sort).
    for k in (3, 5, 6):
        torch.testing.assert_close(sa.sampling_logprobs(logits.expand(6, 6), ids, top_k=k, top_p=0.92), expected)
    assert sa.sampling_logprobs(logits.expand(6, 6), ids, top_k=2, top_p=0.92)[:4].isinf().all()
    # Two more tokens below the top-6: top-p runs on the sorted top-k values only.
    wider = torch.cat([logits, torch.full((1, 2), -5.0, dtype=torch.float64)], dim=-1).expand(6, 8)
    torch.testing.assert_close(sa.sampling_logprobs(wider, ids, top_k=6, top_p=0.92), expected)


def test_full_softmax_and_chunks_and_dtypes():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, 40, generator=gen)
    ids = torch.randint(0, 40, (5, 7), generator=gen)
    plain = sa.sampling_logprobs(logits, ids, temperature=0.5)
    torch.testing.assert_close(plain, torch.log_softmax(logits / 0.5, -1).gather(-1, ids[..., None])[..., 0])
    settings = {"temperature": 0.9, "top_k": 10, "top_p": 0.8, "min_p": 0.05}
    whole = sa.sampling_logprobs(logits, ids, **settings)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(sa.sampling_logprobs(logits, ids, chunk_rows=3, **settings), whole, rtol=0, atol=0)
    half = sa.sampling_logprobs(logits.bfloat16(), ids, **settings)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, _reference(logits.bfloat16().double(), ids, **settings).float())
    empty = sa.sampling_logprobs(torch.zeros(0, 40), torch.zeros(0, dtype=torch.long), top_p=0.9)
    assert empty.shape == (0,)
    banned = logits[0, 0].clone()
    banned[:5] = -math.inf
    out = sa.sampling_logprobs(banned, torch.tensor(0), top_p=0.9)
    assert out == -math.inf


def test_gradient_by_autograd_and_against_the_renormalized_softmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = logits.detach().argsort(-1, descending=True)[:, 1]  # the second-best token: kept by every setting
    settings = {"temperature": 0.8, "top_k": 6, "top_p": 0.9, "min_p": 0.05}
    assert torch.autograd.gradcheck(lambda x: sa.sampling_logprobs(x, ids, **settings), (logits,))
    # Documented gradient: (onehot(id) − μ) / τ over the kept set, 0 outside it.
    (grad,) = torch.autograd.grad(sa.sampling_logprobs(logits, ids, **settings).sum(), logits)
    all_ids = torch.arange(12).expand(4, 12)
    mu = sa.sampling_logprobs(logits.detach()[:, None].expand(4, 12, 12), all_ids, **settings).exp()
    expected = (torch.nn.functional.one_hot(ids, 12).double() - mu) / 0.8
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    outside = sa.sampling_logprobs(logits, logits.detach().argmin(-1), top_k=2)
    assert outside.isinf().all()
    (zero,) = torch.autograd.grad(torch.where(outside.isinf(), 0.0, outside).sum(), logits)
    assert (zero == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "0.9"}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": math.inf}, "min_p"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sa.sampling_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="ids"):
        sa.sampling_logprobs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        sa.sampling_logprobs(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="ids"):
        sa.sampling_logprobs(torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(TypeError, match="logits"):
        sa.sampling_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        sa.sampling_logprobs(torch.tensor([[0.0, math.nan]]), torch.zeros(1, dtype=torch.long))
    # Off values keep vLLM's conventions.
    z, i = torch.randn(3, 9), torch.zeros(3, dtype=torch.long)
    full = sa.sampling_logprobs(z, i)
    for off in ({"top_k": -1}, {"top_k": 0}, {"top_p": 1.0}, {"min_p": 0.0}, {"top_k": 9}):
        torch.testing.assert_close(sa.sampling_logprobs(z, i, **off), full)
