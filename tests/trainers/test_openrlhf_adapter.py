"""The OpenRLHF adapter against the installed OpenRLHF 0.11.2 and DeepSpeed (CPU).

* Drop-in: for every constructor combination OpenRLHF's ``PolicyLoss`` accepts (the enumeration
  of test_openrlhf_parity.py), ours returns the same 5-tuple (values and None-ness) and the same
  gradient, with local and global counts; invalid combinations raise OpenRLHF's errors.
* ``patch()`` on the real ``openrlhf.trainer.ray.ppo_actor``. That module imports ``vllm`` and
  ``flash_attn`` (GPU-only packages, not installed here): only those two third-party packages are
  stubbed in ``sys.modules`` while it is imported; OpenRLHF itself is never stubbed. Building an
  ``ActorPPOTrainer`` on CPU also needs ``torch_dist_barrier_and_cuda_sync`` (a barrier + CUDA
  sync) to be a no-op and ``torch.cuda.current_device()`` to answer 0 (its replay buffer names
  ``cuda:0``): both with ``monkeypatch``, in that one test.
* The DeepSpeed hook on a real ``deepspeed.initialize`` engine (gloo, one CPU process, in a
  subprocess: ZeRO-0 and ZeRO-2, against a plain-PyTorch reference). DeepSpeed's CPU backend
  JIT-builds a shared-memory comm op at init; the subprocess replaces ``build_shm_op`` with
  ``None`` (one rank needs no shared memory).
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import stable_async as sa
from openrlhf_cases import accepted_combinations, combo_id
from sa_testing import load_openrlhf_loss_module, random_logprobs, random_mask
from stable_async.integrations import openrlhf as adapter

pytestmark = pytest.mark.trainers

THEIRS = load_openrlhf_loss_module().PolicyLoss
OURS = adapter.PolicyLoss

EXACT = {"rtol": 1e-10, "atol": 1e-13}
FRACTION = {"rtol": 1e-6, "atol": 1e-7}


# ---------------------------------------------------------------------------------------------
# Inputs and the enumeration (as in test_openrlhf_parity.py)
# ---------------------------------------------------------------------------------------------
def inputs(seed: int, *, B: int = 7, T: int = 10, empty_row: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    lp = random_logprobs((B, T), g)
    old = (lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = random_mask(B, T, g)
    lp[0, 0], old[0, 0], rollout[0, 0] = -1e-3, 0.0, -1e-4  # where OpenRLHF's probability clamp matters
    lp[1, 0], old[1, 0], rollout[1, 0] = -1e-3, -1e-9, -1e-7
    if empty_row:
        mask[2] = False
    return {"lp": lp, "old": old, "rollout": rollout, "adv": torch.randn(B, T, generator=g, dtype=torch.float64)}, mask


COMBINATIONS = accepted_combinations(THEIRS)


def run(cls, kwargs: dict, t: dict, mask: torch.Tensor, counts: dict, **options):
    """(5-tuple, d loss / d log_probs) of ``cls(**kwargs)`` on fresh leaves."""
    lp = t["lp"].clone().requires_grad_(True)
    out = cls(**kwargs, **options)(lp, t["old"], t["adv"], mask, rollout_log_probs=t["rollout"], **counts)
    (grad,) = torch.autograd.grad(out[0], lp)
    return out, grad


def assert_close(ours, theirs, **tolerance) -> None:
    torch.testing.assert_close(
        torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64), **tolerance
    )


def assert_same_tuple(ours, theirs, grads, *, per_sample: bool, mask: torch.Tensor) -> None:
    assert len(ours) == len(theirs) == 5
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a is None) == (b is None), f"element {i}: None-ness differs"
        if a is not None:
            assert isinstance(a, torch.Tensor) and a.dim() == 0
    # OpenRLHF's per-sample mode divides by count + 1e-8 (ours by the count): see the parity test.
    loss_tol = {"rtol": 2e-8, "atol": 2e-8 * max(1.0, float(theirs[0].detach().abs()))} if per_sample else EXACT
    assert_close(ours[0], theirs[0], **loss_tol)
    assert_close(grads[0], grads[1], **({"rtol": 2e-8, "atol": 1e-13} if per_sample else EXACT))
    assert_close(ours[1], theirs[1], **FRACTION)
    assert_close(ours[2], theirs[2], **EXACT)
    if theirs[3] is not None:
        assert_close(ours[3], theirs[3], **EXACT)
        assert_close(ours[4], theirs[4], **FRACTION)


CASES = {"local": (0, False, True), "global": (1, True, True), "no-empty-row": (2, False, False)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kwargs", COMBINATIONS, ids=combo_id)
def test_drop_in_matches_openrlhf(kwargs, case):
    seed, global_counts, empty_row = CASES[case]
    t, mask = inputs(seed, empty_row=empty_row)
    counts = {}
    if global_counts:
        counts = {"dp_size": 4, "batch_num_tokens": float(mask.sum() * 3 + 2), "global_batch_size": 19.0}
    theirs, g_theirs = run(THEIRS, kwargs, t, mask.double(), counts)
    ours, g_ours = run(OURS, kwargs, t, mask.double(), counts)
    per_sample = kwargs["policy_loss_type"] == "gspo" or not kwargs["token_level_loss"]
    assert_same_tuple(ours, theirs, (g_ours, g_theirs), per_sample=per_sample, mask=mask)


def test_combinations_cover_the_constructor():
    assert len(COMBINATIONS) == 88


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_bool_mask_and_fp32_inputs(mask_dtype):
    # OpenRLHF's trainer passes a bool action_mask and fp32 log-probs.
    t, mask = inputs(3)
    t = {k: v.float() for k, v in t.items()}
    kwargs = dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0), clip_eps_high=0.28)
    theirs, g_theirs = run(THEIRS, kwargs, t, mask.to(mask_dtype), {})
    ours, g_ours = run(OURS, kwargs, t, mask.to(mask_dtype), {})
    torch.testing.assert_close(ours[0].float(), theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.float(), g_theirs, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_action_mask_none_is_all_valid():
    t, _ = inputs(4)
    theirs, g_theirs = run(THEIRS, {}, t, None, {})
    ours, g_ours = run(OURS, {}, t, None, {})
    assert_same_tuple(ours, theirs, (g_ours, g_theirs), per_sample=False, mask=None)


# ---------------------------------------------------------------------------------------------
# Constructor errors
# ---------------------------------------------------------------------------------------------
INVALID = [
    dict(dual_clip=1.0),
    dict(dual_clip=0.5, is_correction_level="bogus"),
    dict(is_correction_level="sequence"),
    dict(is_correction_mode="truncate"),
    dict(is_correction_gating="k3"),
    dict(is_correction_level="seq", is_correction_mode="clip"),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv"),
    dict(is_correction_level="off", is_correction_mode="clip", is_correction_gating="binary_kl"),
    dict(is_correction_level="token", is_correction_gating="binary_kl"),  # default threshold low 0.5 > 0
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.1, 0.2)),
    dict(policy_loss_type="gspo", is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv"),
]


@pytest.mark.parametrize("kwargs", INVALID, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_constructor_errors_match_openrlhf(kwargs):
    with pytest.raises((ValueError, AssertionError)) as theirs:
        THEIRS(**kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        OURS(**kwargs)
    assert str(ours.value) == str(theirs.value)


def test_invalid_policy_loss_type_fails_at_construction_with_openrlhf_message():
    t, mask = inputs(0)
    theirs = THEIRS(policy_loss_type="grpo")  # OpenRLHF only fails in forward
    with pytest.raises(ValueError) as err_theirs:
        theirs(t["lp"], t["old"], t["adv"], mask.double())
    with pytest.raises(ValueError) as err_ours:
        OURS(policy_loss_type="grpo")
    assert str(err_ours.value) == str(err_theirs.value)


def test_our_option_errors_name_the_argument():
    with pytest.raises(TypeError, match="^correction:"):
        OURS(correction="icepop")
    with pytest.raises(ValueError, match="^correction:"):
        OURS(correction={"level": "bogus"})
    with pytest.raises(TypeError, match="^loss_kwargs:"):
        OURS(loss_kwargs={"eps_high": 0.3})
    with pytest.raises(KeyError, match="unknown loss"):
        OURS(policy_loss="no_such_loss")
    with pytest.raises(TypeError, match="^ess_lr:"):
        OURS(ess_lr="sqrt")
    with pytest.raises(ValueError, match="rule"):
        OURS(ess_lr={"rule": "cubic"})
    with pytest.raises(ValueError, match="^rollout_log_probs:"):
        t, mask = inputs(0)
        OURS(policy_loss_type="gspo", is_correction_level="token")(t["lp"], t["old"], t["adv"], mask)


# Misconfigurations of our optimizer-side options: refused where the user types them (the loss, or
# the driver's runtime_env), with the option and the key in the message, never later in a worker.
BAD_OPTIONS = [
    ({"gac": {"mode": "skip"}}, ValueError, r"^gac: mode='skip' is not supported"),
    ({"gac": {"memory": "sketch"}}, ValueError, r"^gac: .*memory='sketch'"),
    ({"gac": {"treshold": 0.5}}, TypeError, r"^gac: unknown key 'treshold'"),
    ({"gac": {"threshold": 1.5}}, ValueError, r"^gac: .*threshold"),
    ({"gac": {"threshold": "0.5"}}, ValueError, r"^gac: .*threshold"),
    ({"gac": "project"}, TypeError, r"^gac: expected True"),
    ({"ess_lr": {"rule": "cubic"}}, ValueError, r"^ess_lr: .*rule"),
    ({"ess_lr": {"base_ratoi": 0.5}}, TypeError, r"^ess_lr: unknown key 'base_ratoi'"),
    ({"ess_lr": {"min_scale": 2.0}}, ValueError, r"^ess_lr: .*min_scale"),
    ({"loss_kwargs": {"eps_hihg": 0.3}, "policy_loss": "ppo"}, TypeError, r"^eps_hihg: not a hyperparameter"),
    ({"correction": {"levle": "token"}}, TypeError, r"^correction: .*levle"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("where", ["PolicyLoss", "runtime_env"])
def test_option_misconfigurations_fail_at_construction_naming_the_key(where, options, error, match):
    build = OURS if where == "PolicyLoss" else adapter.runtime_env
    with pytest.raises(error, match=match):
        build(**options)


def test_documented_gac_options_are_accepted():
    for gac in (True, {"mode": "monitor", "memory": "sketch"}, {"mode": "project", "memory": "bf16", "threshold": 0.7}):
        assert OURS(gac=gac).gac == ({} if gac is True else gac)
        assert adapter.runtime_env(gac=gac)["worker_process_setup_hook"]


# ---------------------------------------------------------------------------------------------
# Our options through the drop-in
# ---------------------------------------------------------------------------------------------
ROLLOUT_LOSSES = ["dppo_binary_tv", "dppo_binary_kl", "vcpo", "cispo", "sapo", "gspo_token", "reinforce", "m2po"]


@pytest.mark.parametrize("name", ROLLOUT_LOSSES)
def test_policy_loss_by_name_equals_the_core_loss(name):
    t, mask = inputs(5)
    counts = {"dp_size": 2, "batch_num_tokens": float(mask.sum() * 2), "global_batch_size": 14.0}
    ours, g_ours = run(OURS, {"token_level_loss": False}, t, mask, counts, policy_loss=name, correction=False)
    lp = t["lp"].clone().requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp, advantages=t["adv"], mask=mask, old_logprobs=t["old"], rollout_logprobs=t["rollout"],
        global_num_tokens=counts["batch_num_tokens"], global_num_seqs=14.0, dp_size=2,
    )  # fmt: skip
    core = sa.get_loss(name)  # its own aggregation: OpenRLHF's token_level_loss is not read
    expected = core(batch)
    (g_core,) = torch.autograd.grad(expected.loss, lp)
    assert_close(ours[0], expected.loss, **EXACT)
    assert_close(g_ours, g_core, **EXACT)
    assert ours[3] is None and ours[4] is None  # no correction → OpenRLHF's None-ness
    assert_close(ours[1], expected.metrics.get("actor/pg_clipfrac", 0.0), **FRACTION)


def test_policy_loss_keeps_the_translated_correction_and_loss_kwargs_win():
    t, mask = inputs(6)
    kwargs = dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0), token_level_loss=True)
    ours, _ = run(OURS, kwargs, t, mask, {}, policy_loss="dppo_binary_tv", loss_kwargs={"delta_high": 0.3})
    correction = sa.RolloutCorrection(mode="mask", low=0.5, high=2.0, weight="token")
    batch = sa.PolicyBatch(
        logprobs=t["lp"], advantages=t["adv"], mask=mask, old_logprobs=t["old"], rollout_logprobs=t["rollout"]
    )
    expected = sa.get_loss("dppo_binary_tv", delta_high=0.3, correction=correction)(batch)
    assert_close(ours[0], expected.loss, **EXACT)
    assert_close(ours[3], expected.metrics["rollout_corr/kl"], **EXACT)
    assert_close(ours[4], expected.metrics["rollout_corr/rollout_rs_masked_fraction"], **FRACTION)


@pytest.mark.parametrize(
    "correction",
    [sa.RolloutCorrection(level="sequence", mode="truncate", high=2.0), {"mode": "mask", "low": 0.5, "high": 2.0}],
)
def test_correction_override(correction):
    t, mask = inputs(7)
    ours, _ = run(OURS, {"policy_loss_type": "gspo"}, t, mask, {}, correction=correction)
    if isinstance(correction, dict):
        correction = sa.RolloutCorrection(**correction)
    batch = sa.PolicyBatch(
        logprobs=t["lp"], advantages=t["adv"], mask=mask, old_logprobs=t["old"], rollout_logprobs=t["rollout"]
    )
    expected = sa.get_loss("gspo", eps_low=0.2, eps_high=0.2, correction=correction)(batch)
    assert_close(ours[0], expected.loss, **EXACT)
    assert ours[3] is not None and ours[4] is not None


def test_ess_is_recorded_over_micro_batches():
    loss_fn = OURS(ess_lr=True)
    t1, m1 = inputs(8, T=10)
    t2, m2 = inputs(9, B=5, T=6)
    for t, m in ((t1, m1), (t2, m2)):
        loss_fn(t["lp"], t["old"], t["adv"], m, rollout_log_probs=t["rollout"])
    ess = loss_fn.accumulator.reduce().sequence
    seq_lw = torch.cat([((t["lp"] - t["rollout"]) * m).sum(-1)[m.any(-1)] for t, m in ((t1, m1), (t2, m2))])
    assert ess.n == seq_lw.numel()
    assert ess.ess_ratio == pytest.approx(sa.effective_sample_size(seq_lw).ess_ratio, rel=1e-12)


def test_two_losses_with_their_hooks_in_one_process_step_with_their_own_ess():
    """Two models, two PolicyLoss + hooks, micro-batches interleaved: each step sees its own records only."""
    pytest.importorskip("deepspeed")
    engines, losses = [], []
    for _ in range(2):
        net = torch.nn.Linear(3, 4).double()
        engines.append(types.SimpleNamespace(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1)))
        losses.append(OURS(is_correction_level="token", ess_lr=True))
        adapter.attach_deepspeed(engines[-1], losses[-1])
    t_stale, m_stale = inputs(3)
    t_fresh, m_fresh = inputs(4)
    t_fresh["rollout"] = t_fresh["lp"].clone()  # on-policy: ESS/N = 1
    for _ in range(3):
        losses[0](t_fresh["lp"], t_fresh["old"], t_fresh["adv"], m_fresh, rollout_log_probs=t_fresh["rollout"])
        losses[1](t_stale["lp"], t_stale["old"], t_stale["adv"], m_stale, rollout_log_probs=t_stale["rollout"])
    for engine in engines:
        for p in engine.module.parameters():
            p.grad = torch.ones_like(p)
        engine.optimizer.step()
    expected = sa.effective_sample_size(t_stale["lp"] - t_stale["rollout"], m_stale).ess_ratio
    assert expected < 0.9
    assert losses[0].step_hook.last_metrics["vcpo/ess_ratio"] == pytest.approx(1.0)
    assert losses[1].step_hook.last_metrics["vcpo/ess_ratio"] == pytest.approx(expected, rel=1e-12)
    assert all("vcpo/ess_ratio" not in loss.last_metrics for loss in losses)  # the loss's own metrics only
    # Cleared by their own steps only; bounded memory whatever the number of forwards.
    assert [loss.accumulator.num_records for loss in losses] == [0, 0]
    for _ in range(30):
        losses[1](t_stale["lp"], t_stale["old"], t_stale["adv"], m_stale, rollout_log_probs=t_stale["rollout"])
    assert losses[0].accumulator.num_records == 0
    assert losses[1].accumulator.state.numel() == len(sa.optim.accumulator.STATISTICS)


# ---------------------------------------------------------------------------------------------
# patch() on the real openrlhf.trainer.ray.ppo_actor
# ---------------------------------------------------------------------------------------------
GPU_ONLY = ("vllm", "flash_attn")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in GPU_ONLY:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@pytest.fixture(scope="module")
def ppo_actor():
    """The real ``openrlhf.trainer.ray.ppo_actor``, imported with vllm / flash_attn stubbed meanwhile."""
    if "openrlhf.trainer.ray.ppo_actor" in sys.modules:
        return sys.modules["openrlhf.trainer.ray.ppo_actor"]
    models = sys.modules.get("openrlhf.models")
    if models is not None and not hasattr(models, "Actor"):  # the bare package of load_openrlhf_loss_module
        del sys.modules["openrlhf.models"]  # the real __init__ reuses the loaded openrlhf.models.loss
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in GPU_ONLY]:
            del sys.modules[name]  # keep find_spec("vllm") false for other tests (TRL checks it)


def test_patch_swaps_policy_loss_and_undoes(ppo_actor):
    original, original_init = ppo_actor.PolicyLoss, ppo_actor.ActorPPOTrainer.__init__
    assert original is THEIRS
    with adapter.patch(policy_loss="dppo_binary_tv", correction=False) as handle:
        assert ppo_actor.PolicyLoss is handle.loss_class and issubclass(ppo_actor.PolicyLoss, OURS)
        built = ppo_actor.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level="token")
        assert built.loss_fn.name == "dppo_binary_tv" and built.correction is None
        again = adapter.patch()  # patching again replaces the previous patch
        assert ppo_actor.PolicyLoss is again.loss_class and not handle.active
        assert ppo_actor.PolicyLoss().loss_fn.name == "ppo"
        adapter.unpatch()
        assert ppo_actor.PolicyLoss is original
    assert ppo_actor.PolicyLoss is original and ppo_actor.ActorPPOTrainer.__init__ is original_init


def trainer_args(**actor):
    ns = types.SimpleNamespace
    return ns(
        actor=ns(eps_clip_low_high=(0.2, 0.28), dual_clip=None, loss_agg_mode="token-mean", policy_loss_type="ppo",
                 aux_loss_coef=0.0, **actor),
        algo=ns(advantage=ns(is_correction_level="token", is_correction_mode="mask", is_correction_gating="ratio",
                             is_correction_threshold=(0.5, 5.0))),
        train=ns(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, async_enable=False),
        ds=ns(packing_samples=False),
        vllm=ns(sync_backend="nccl"),
    )  # fmt: skip


def test_actor_trainer_builds_our_loss_and_attaches_the_hook(ppo_actor, monkeypatch):
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the replay buffer names cuda:0
    model = torch.nn.Linear(3, 2)
    engine = types.SimpleNamespace(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    strategy = types.SimpleNamespace(args=trainer_args())
    actor = types.SimpleNamespace(model=engine)

    def recorder(trainer, kl_ctl):  # stands in for OpenRLHF's ppo_train (a replay buffer and DeepSpeed)
        return {"rollout_batch_marked": trainer.actor_loss_fn.step_hook.stepper._new_rollout_batch}

    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "ppo_train", recorder)
    with adapter.patch(ess_lr={"rule": "linear"}, gac={"mode": "monitor"}):
        trainer = ppo_actor.ActorPPOTrainer(strategy, actor, None, engine.optimizer, None)
        loss = trainer.actor_loss_fn
        assert isinstance(loss, OURS) and loss.clip_eps_high == 0.28 and loss.correction is not None
        assert loss.step_hook is not None and engine.optimizer.step == loss.step_hook.step
        # ppo_train (one replay buffer, max_epochs passes) marks a new rollout batch for GAC first.
        assert trainer.ppo_train(0.0) == {"rollout_batch_marked": True}
        loss.step_hook.detach()
    assert "step" not in vars(engine.optimizer) and ppo_actor.ActorPPOTrainer.ppo_train is recorder
    plain = ppo_actor.ActorPPOTrainer(strategy, actor, None, engine.optimizer, None)
    assert type(plain.actor_loss_fn) is THEIRS


def test_worker_setup_hook_reads_runtime_env(ppo_actor, monkeypatch):
    env = adapter.runtime_env(
        {"env_vars": {"NCCL_DEBUG": "WARN"}}, policy_loss="vcpo", correction={"mode": "mask", "high": 2.0}
    )
    assert env["worker_process_setup_hook"] == "stable_async.integrations.openrlhf.worker_setup"
    assert env["env_vars"]["NCCL_DEBUG"] == "WARN"
    json.dumps(env)  # Ray serializes it
    for key, value in env["env_vars"].items():
        monkeypatch.setenv(key, value)
    module_path, _, func = env["worker_process_setup_hook"].rpartition(".")
    try:
        getattr(importlib.import_module(module_path), func)()  # what Ray does in each worker
        built = ppo_actor.PolicyLoss(is_correction_level="token")
        assert built.loss_fn.name == "vcpo" and built.correction == sa.RolloutCorrection(mode="mask", high=2.0)
    finally:
        adapter.unpatch()
    assert ppo_actor.PolicyLoss is THEIRS
    with pytest.raises(TypeError, match="^ess: not an option"):
        adapter.runtime_env(ess=True)


# ---------------------------------------------------------------------------------------------
# DeepSpeed hook
# ---------------------------------------------------------------------------------------------
def test_hook_on_a_stand_in_engine_equals_the_core_wrappers():
    # A plain torch optimizer behind an engine-shaped object: safe_get_full_grad returns p.grad.
    pytest.importorskip("deepspeed")
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    model = copy.deepcopy(ref_model)
    opt, ref_opt = torch.optim.AdamW(model.parameters(), lr=0.05), torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    engine = types.SimpleNamespace(module=model, optimizer=opt)
    loss_fn = OURS(
        is_correction_level="token",
        ess_lr={"rule": "sqrt"},
        gac={"mode": "project", "threshold": 0.0, "one_sided": False},
    )
    hook = adapter.attach_deepspeed(engine, loss_fn)
    ref_loss = OURS(is_correction_level="token")
    ref_ess = sa.ESSScaledLR(ref_opt)
    ref_gac = sa.GradientAlignmentControl(list(ref_model.parameters()), mode="project", threshold=0.0, one_sided=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    actions = torch.randint(0, 3, (6, 5), generator=g)
    for step in range(3):
        rollout = -torch.rand(6, 5, generator=g, dtype=torch.float64) - 0.5
        adv = torch.randn(6, 5, generator=g, dtype=torch.float64)
        mask = random_mask(6, 5, g)
        for net, fn in ((model, loss_fn), (ref_model, ref_loss)):
            lp = torch.log_softmax(net(x), -1).gather(-1, actions)
            fn(lp, lp.detach(), adv, mask, rollout_log_probs=rollout)[0].backward()
        lp = torch.log_softmax(ref_model(x), -1).gather(-1, actions).detach()
        expected_ess = sa.effective_sample_size(lp - rollout, mask)
        ref_metrics = ref_gac.apply()
        ref_ess.step(expected_ess)
        engine.optimizer.step()
        assert hook.last_metrics["vcpo/ess_ratio"] == pytest.approx(expected_ess.ess_ratio, rel=1e-12)
        if step > 0:
            assert hook.last_metrics["gac/cos"] == pytest.approx(ref_metrics["gac/cos"], rel=1e-9)
            assert hook.last_metrics["gac/action"] == 1.0  # projected
        assert opt.param_groups[0]["lr"] == 0.05  # restored
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        opt.zero_grad(), ref_opt.zero_grad()
    hook.detach()
    assert "step" not in vars(opt) and loss_fn.step_hook is None
    with pytest.raises(ValueError, match="^gac: mode='skip'"):
        adapter.attach_deepspeed(engine, loss_fn, gac={"mode": "skip"})


def test_hook_on_a_real_deepspeed_engine():
    """ZeRO-0 and ZeRO-2 engines (gloo, one CPU rank) give the plain-PyTorch reference's parameters."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "SA_DS_PORT": str(__import__("sa_testing").free_port())}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "deepspeed-worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in ("0", "2"):
        assert result[stage]["max_param_diff"] < 1e-6, result
        assert result[stage]["steps"] == 3 and result[stage]["lr_restored"], result
        assert result[stage]["gac_cos"][1:] == pytest.approx(result["reference"]["gac_cos"][1:], abs=1e-5)
        assert result[stage]["ess"] == pytest.approx(result["reference"]["ess"], rel=1e-6)


def _deepspeed_worker() -> None:
    """Run in a subprocess: 3 optimizer steps × 2 micro-batches under ZeRO-0, ZeRO-2 and plain torch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["SA_DS_PORT"], RANK="0", WORLD_SIZE="1")
    os.environ["LOCAL_RANK"] = "0"
    import logging

    import deepspeed
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build on CPU
    dist.init_process_group("gloo", rank=0, world_size=1)

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    options = {
        "is_correction_level": "token",
        "ess_lr": True,
        "gac": {"mode": "project", "threshold": 0.0, "one_sided": False},
    }

    def train(stage):
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        loss_fn = OURS(**options)
        if stage is None:
            engine = types.SimpleNamespace(module=model, optimizer=opt)
        else:
            config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
            config["zero_optimization"] = {"stage": stage}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        hook = adapter.attach_deepspeed(engine, loss_fn)
        g = torch.Generator().manual_seed(1)
        out = {"gac_cos": [], "ess": [], "steps": 0, "lr_restored": True}
        counter = {"n": 0}
        original = hook.original_step

        def counting_step(*a, **k):
            counter["n"] += 1
            return original(*a, **k)

        hook.original_step = counting_step
        hook.ess_lr.optimizer._step = counting_step
        for _ in range(3):
            for _micro in range(2):
                x = torch.randn(4, 4, generator=g)
                actions = torch.randint(0, 3, (4, 5), generator=g)
                rollout = -torch.rand(4, 5, generator=g) - 0.5
                adv = torch.randn(4, 5, generator=g)
                net = engine if stage is not None else model
                lp = torch.log_softmax(net(x).unsqueeze(1).expand(4, 5, 3), -1).gather(-1, actions.unsqueeze(-1))[
                    ..., 0
                ]
                loss = loss_fn(lp, lp.detach(), adv, torch.ones(4, 5), rollout_log_probs=rollout)[0] / (
                    2 if stage is None else 1  # DeepSpeed divides by the accumulation steps itself
                )
                if stage is None:
                    loss.backward()
                else:
                    engine.backward(loss)
                    engine.step()
            if stage is None:
                opt.step()
                opt.zero_grad()
            out["gac_cos"].append(hook.last_metrics["gac/cos"] if out["ess"] else 0.0)
            out["ess"].append(hook.last_metrics["vcpo/ess_ratio"])
            out["lr_restored"] &= hook.optimizer.param_groups[0]["lr"] == 0.05
        out["steps"] = counter["n"]
        params = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
        return out, params

    reference, ref_params = train(None)
    result = {"reference": reference}
    for stage in (0, 2):
        out, params = train(stage)
        out["max_param_diff"] = float((params - ref_params).abs().max())
        result[str(stage)] = out
    dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__" and sys.argv[1:] == ["deepspeed-worker"]:
    _deepspeed_worker()
