"""The veRL adapter against the installed veRL: plugin loading, veRL's own ``ppo_loss``, config, optimizer.

Micro-batches are built the way veRL's engine hands them to ``ppo_loss``: response-layout
(B, T) tensors, left-padded prompts and right-padded responses with an ``attention_mask``, and
``model_output["log_probs"]`` as a jagged nested tensor over the packed prompt+response tokens
(position i holds the log-prob of token i + 1), so veRL's ``no_padding_2_padding`` runs for real.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import stable_async as sa
from sa_testing import verl_actor_config

pytestmark = pytest.mark.trainers

pytest.importorskip("verl")
tensordict = pytest.importorskip("tensordict")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils import losses as verl_losses  # noqa: E402

from stable_async.integrations import verl as adapter  # noqa: E402
from stable_async.integrations import verl_plugin  # noqa: E402


@pytest.fixture(autouse=True)
def _adapter_logger_reaches_caplog(caplog):
    """Another trainer imported in the same session (AReaL) swaps ``logging.getLogger``, so the
    adapter's logger may no longer descend from the root logger caplog listens on: hand it
    caplog's handler directly for the tests that read its records."""
    log = logging.getLogger("stable_async.integrations.verl")
    log.addHandler(caplog.handler)
    yield
    log.removeHandler(caplog.handler)


EXACT = {"rtol": 1e-10, "atol": 1e-13}


# --------------------------------------------------------------------------- micro-batch builder
def micro_batch(seed: int = 0, *, B: int = 5, P: int = 3, T: int = 6, K: int = 0, vocab: int = 11, weights=False):
    """(data TensorDict, leaf log-probs (B, T), packed-position index (B, T), packed length N, extras)."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, P + 1, (B,), generator=g)
    rlen = torch.randint(1, T + 1, (B,), generator=g)
    rlen[0] = T
    att = torch.zeros(B, P + T, dtype=torch.long)
    for b in range(B):
        att[b, P - plen[b] : P] = 1
        att[b, P : P + rlen[b]] = 1
    mask = att[:, P:].bool()
    lp = (-4 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.01).requires_grad_(True)
    old = (lp.detach() + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (plen + rlen).cumsum(0)])
    position = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        position[b, : rlen[b]] = offsets[b] + plen[b] - 1 + torch.arange(int(rlen[b]))
    fields = {
        "prompts": torch.randint(0, vocab, (B, P), generator=g),
        "responses": torch.randint(0, vocab, (B, T), generator=g),
        "attention_mask": att,
        "response_mask": mask.long(),
        "old_log_probs": old,
        "advantages": torch.randn(B, T, generator=g, dtype=torch.float64),
        "rollout_log_probs": rollout,
    }
    if weights:
        fields["rollout_is_weights"] = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    if K:
        fields[adapter.TOPK_IDS_KEY] = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(B * T)]).view(
            B, T, K
        )
        fields[adapter.TOPK_LOGPROBS_KEY] = torch.log_softmax(
            torch.randn(B, T, K + 1, generator=g, dtype=torch.float64), -1
        )[..., :K]
    data = tensordict.TensorDict(fields, batch_size=[B])
    n = int(offsets[-1])
    # The packed token ids, as veRL's left_right_2_no_padding leaves them (jagged, prompt + response).
    data["input_ids"] = torch.nested.nested_tensor_from_jagged(torch.randint(0, vocab, (n,), generator=g), offsets)
    return data, lp, position, offsets, n


def packed(values_bt: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, n: int):
    """A (B, T) response tensor as veRL's packed jagged model output."""
    flat = torch.zeros(n, dtype=values_bt.dtype).index_put((position[mask],), values_bt[mask])
    return torch.nested.nested_tensor_from_jagged(flat, offsets)


def set_global_info(data, dp: bool) -> None:
    mask = data["response_mask"].bool()
    if dp:
        tu.assign_non_tensor(
            data, dp_size=4, batch_num_tokens=int(mask.sum()) * 4 - 3, global_batch_size=int(mask.any(-1).sum()) * 4
        )
    else:
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)


def grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return g


def metric_values(metrics: dict) -> dict[str, float]:
    return {k: float(v.aggregate()) if hasattr(v, "aggregate") else float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- plugin
def test_fresh_import_verl_resolves_every_loss():
    # Only `import verl`: the entry point must register every sa_<name> on its own.
    script = (
        "import json, sys, verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "import stable_async as sa\n"
        "ok = {n: callable(get_policy_loss_fn('sa_' + n)) for n in sa.available_losses()}\n"
        "print(json.dumps(ok))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", "VERL_USE_EXTERNAL_MODULES")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(ok) == sa.available_losses() and all(ok.values()), ok
    assert "stable-async" not in proc.stderr  # no error logged


def test_registration_is_idempotent_and_leaves_foreign_names(monkeypatch, caplog):
    before = {k: v for k, v in core_algos.POLICY_LOSS_REGISTRY.items() if k.startswith("sa_")}
    assert sorted(before) == adapter.registered_names()
    assert adapter.register_all() == adapter.registered_names()
    assert verl_plugin.load() == adapter.registered_names()
    for key, fn in before.items():
        assert core_algos.POLICY_LOSS_REGISTRY[key] is fn
    foreign = lambda *a, **k: None  # noqa: E731
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "sa_ppo", foreign)
    with caplog.at_level(logging.WARNING, logger="stable_async.integrations.verl"):
        names = adapter.register_all()
    assert "sa_ppo" not in names and core_algos.POLICY_LOSS_REGISTRY["sa_ppo"] is foreign
    assert any("taken" in r.getMessage() for r in caplog.records)


def test_broken_registration_is_loud(monkeypatch, caplog):
    real = adapter.make_policy_loss_fn

    def broken(name):
        if name == "vcpo":
            raise RuntimeError("simulated breakage")
        return real(name)

    monkeypatch.setattr(adapter, "make_policy_loss_fn", broken)
    monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, "sa_vcpo")
    monkeypatch.delenv(verl_plugin.STRICT_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        names = adapter.register_all()
    assert "sa_vcpo" not in names and "sa_ppo" in names
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "sa_vcpo" in errors[0].getMessage() and "simulated breakage" in errors[0].getMessage()

    monkeypatch.setenv(verl_plugin.STRICT_ENV, "1")
    with pytest.raises(verl_plugin.StrictPluginFailure):
        adapter.register_all()
    # veRL's loader catches Exception only: the strict failure is not one, so it is not swallowed.
    assert not issubclass(verl_plugin.StrictPluginFailure, Exception)


def test_plugin_load_failure_is_logged_at_error(monkeypatch, caplog):
    def boom():
        raise ImportError("simulated missing dependency")

    monkeypatch.setattr(adapter, "register_all", boom)
    monkeypatch.delenv(verl_plugin.STRICT_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        assert verl_plugin.load() == []
    assert any(r.levelno >= logging.ERROR and "simulated missing dependency" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(verl_plugin.STRICT_ENV, "1")
    with pytest.raises(verl_plugin.StrictPluginFailure):
        verl_plugin.load()


# --------------------------------------------------------------------------- veRL's own ppo_loss
@pytest.mark.parametrize("weights", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("dp", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_verl_ppo_loss_sa_ppo_equals_vanilla(mode, dp, weights):
    data, lp, position, offsets, n = micro_batch(1, weights=weights)
    set_global_info(data, dp)
    mask = data["response_mask"].bool()
    model_output = {"log_probs": packed(lp, position, mask, offsets, n)}
    results = {}
    for loss_mode in ("vanilla", "sa_ppo"):
        config = verl_actor_config(
            clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode,
            policy_loss={"loss_mode": loss_mode},
        )  # fmt: skip
        loss, metrics = verl_losses.ppo_loss(config, model_output, data)
        (grad,) = torch.autograd.grad(loss, lp, retain_graph=True)
        results[loss_mode] = (loss, grad, metric_values(metrics))
    (loss_v, grad_v, met_v), (loss_s, grad_s, met_s) = results["vanilla"], results["sa_ppo"]
    torch.testing.assert_close(loss_s, loss_v, **EXACT)
    torch.testing.assert_close(grad_s, grad_v, **EXACT)
    assert grad_v.abs().sum() > 0
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert met_s[key] == pytest.approx(met_v[key], rel=1e-6, abs=1e-7), key


def test_set_loss_fn_ppo_loss_feeds_rollout_and_topk():
    # Our ppo_loss called both ways the FSDP engine calls it: as logits processor, then as loss.
    K, V = 3, 11
    data, lp, position, offsets, n = micro_batch(2, K=K, vocab=V)
    set_global_info(data, dp=False)
    mask = data["response_mask"].bool()
    logits = torch.randn(1, n, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    config = verl_actor_config(policy_loss={"loss_mode": "sa_dppo_topk_tv"})
    outputs = adapter.ppo_loss(config, student_logits=logits, data=data)
    assert sorted(outputs) == [f"{adapter.CURRENT_TOPK_PREFIX}{k}" for k in range(K)]
    assert all(v.shape == (1, n) for v in outputs.values())  # the engine's per-token contract
    model_output = {"log_probs": packed(lp, position, mask, offsets, n)}
    model_output.update({k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()})
    loss, metrics = adapter.ppo_loss(config, model_output=model_output, data=data)

    # Reference, by hand: log_softmax of the logits at the position before each response token.
    ids = data[adapter.TOPK_IDS_KEY]
    current = torch.zeros(ids.shape, dtype=torch.float64)
    full = torch.log_softmax(logits[0], -1)
    current = torch.where(mask.unsqueeze(-1), full[position].gather(-1, ids), current)
    batch = sa.PolicyBatch(
        logprobs=lp, advantages=data["advantages"], mask=mask, old_logprobs=data["old_log_probs"],
        rollout_logprobs=data["rollout_log_probs"], topk_ids=ids, topk_logprobs=data[adapter.TOPK_LOGPROBS_KEY],
        current_topk_logprobs=current,
    )  # fmt: skip
    ref = sa.get_loss("dppo_topk_tv", delta_low=0.2, delta_high=0.2, ratio_cap=3.0)(batch)  # veRL defaults mapped
    torch.testing.assert_close(loss, ref.loss, **EXACT)
    torch.testing.assert_close(grad(loss, lp), grad(ref.loss, lp), **EXACT)
    # π_θ at the top-K ids went through the engine's packed layout and back, with its graph to the logits.
    passed = adapter._extras(model_output, data)["current_topk_logprobs"]
    torch.testing.assert_close(passed[mask], current[mask], **EXACT)
    assert passed.grad_fn is not None
    assert 0 < metric_values(metrics)["actor/pg_clipfrac"] < 1


def test_topk_loss_without_logits_names_what_is_missing():
    data, lp, position, offsets, n = micro_batch(3, K=2)
    set_global_info(data, dp=False)
    model_output = {"log_probs": packed(lp, position, data["response_mask"].bool(), offsets, n)}
    config = verl_actor_config(policy_loss={"loss_mode": "sa_dppo_topk_kl"})
    with pytest.raises(ValueError, match="current_topk_logprobs.*distillation_use_topk"):
        verl_losses.ppo_loss(config, model_output, data)


def test_ppo_loss_passes_rollout_logprobs_to_the_anchor():
    # dppo_binary_tv: registered path anchors at old_log_prob (veRL's dppo_tv), ppo_loss at rollout_log_probs.
    data, lp, position, offsets, n = micro_batch(4)
    set_global_info(data, dp=False)
    mask = data["response_mask"].bool()
    model_output = {"log_probs": packed(lp, position, mask, offsets, n)}
    config = verl_actor_config(policy_loss={"loss_mode": "sa_dppo_binary_tv"})
    theirs, _ = verl_losses.ppo_loss(config, model_output, data)
    ours, _ = adapter.ppo_loss(config, model_output=model_output, data=data)
    kwargs = dict(logprobs=lp, advantages=data["advantages"], mask=mask, old_logprobs=data["old_log_probs"])
    hp = dict(delta_low=0.2, delta_high=0.2, ratio_cap=3.0)
    old_anchor = sa.get_loss("dppo_binary_tv", anchor="old", **hp)(sa.PolicyBatch(**kwargs))
    rollout_anchor = sa.get_loss("dppo_binary_tv", **hp)(
        sa.PolicyBatch(**kwargs, rollout_logprobs=data["rollout_log_probs"])
    )
    torch.testing.assert_close(theirs, old_anchor.loss, **EXACT)
    torch.testing.assert_close(ours, rollout_anchor.loss, **EXACT)


# --------------------------------------------------------------------------- hyperparameters / config
def test_hyperparameter_mapping():
    config = verl_actor_config(
        clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0, tau_pos=2.0, loss_scale_factor=64
    )
    hp = adapter.resolve_hyperparameters("ppo", config, "seq-mean-token-sum")
    assert hp == {"aggregation": "seq-mean-token-sum", "norm_length": 64.0, "eps_low": 0.1, "eps_high": 0.3,
                  "dual_clip": 4.0}  # fmt: skip
    assert adapter.resolve_hyperparameters("sapo", config)["tau_pos"] == 2.0
    assert "aggregation" not in adapter.resolve_hyperparameters("sapo", config)
    dppo = adapter.resolve_hyperparameters("dppo_binary_kl", config)
    assert (dppo["delta_low"], dppo["delta_high"], dppo["ratio_cap"], dppo["anchor"]) == (0.1, 0.3, 4.0, "old")
    assert "anchor" not in adapter.resolve_hyperparameters("dppo_binary_kl", config, has_rollout_logprobs=True)
    assert adapter.resolve_hyperparameters("delight", config) == {"aggregation": "token-mean", "norm_length": 64.0}


def _compose(overrides: list[str]):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    base = [
        "actor_rollout_ref.actor.strategy=fsdp",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "trainer.n_gpus_per_node=1",
        "data.train_batch_size=256",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=base + overrides)


SA_OVERRIDES = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=sa_delight",
    "actor_rollout_ref.actor.policy_loss._target_=stable_async.integrations.verl.SAPolicyLossConfig",
    "+actor_rollout_ref.actor.policy_loss.sa_kwargs={eta:0.5,level:sequence}",
    "actor_rollout_ref.actor.optim.optimizer_impl=stable_async.integrations.verl",
    "actor_rollout_ref.actor.optim.optimizer=StableAdamW",
    "actor_rollout_ref.actor.optim.lr=0.01",
    "actor_rollout_ref.actor.optim.override_optimizer_config={gac:monitor,ess_rule:sqrt}",
]


def test_override_syntax_passes_verl_config_validation():
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config.optimizer import build_optimizer

    config = _compose(SA_OVERRIDES)
    validate_config(config, use_reference_policy=False, use_critic=False)  # the driver's check
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # the worker's conversion
    assert type(actor.policy_loss).__name__ == "SAPolicyLossConfig"
    assert actor.policy_loss.loss_mode == "sa_delight"
    hp = adapter.resolve_hyperparameters("delight", actor)
    assert hp["eta"] == 0.5 and hp["level"] == "sequence"
    assert sa.get_loss("delight", **hp).config.eta == 0.5

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), actor.optim)  # veRL's builder, veRL's optim config
    assert isinstance(opt, adapter.StableAdamW) and isinstance(opt.optimizer, torch.optim.AdamW)
    assert opt.gac is not None and opt.gac.mode == "monitor" and opt.rule == "sqrt"
    assert opt.param_groups[0]["betas"] == tuple(actor.optim.betas)  # veRL passes betas to "*adam*" names


def test_verl_own_policy_loss_config_rejects_sa_kwargs_without_target():
    from verl.utils.config import omega_conf_to_dataclass

    config = _compose(["+actor_rollout_ref.actor.policy_loss.sa_kwargs={eta:0.5}"])
    with pytest.raises(Exception, match="sa_kwargs"):
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def test_bad_sa_kwargs_fail_when_the_config_is_built_naming_the_key():
    cls = adapter.SAPolicyLossConfig
    cases = [({"etaa": 1.0}, r"sa_kwargs\.etaa: .*did you mean 'eta'"), ({"correction": {}}, "correction")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            cls(loss_mode="sa_delight", sa_kwargs=kwargs)


# --------------------------------------------------------------------------- optimizer
def test_optimizer_builds_through_build_optimizer_and_scales_lr_by_ess():
    from verl.workers.config.optimizer import FSDPOptimizerConfig, build_optimizer

    torch.manual_seed(0)
    B, T, H = 6, 4, 5
    model = torch.nn.Linear(H, T, dtype=torch.float64)
    reference = torch.nn.Linear(H, T, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    optim_config = FSDPOptimizerConfig(
        lr=0.05, optimizer_impl="stable_async.integrations.verl", optimizer="StableAdamW",
        override_optimizer_config={"gac": "monitor"},
    )  # fmt: skip
    opt = build_optimizer(model.parameters(), optim_config)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.01, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # veRL's scheduler kind
    x = torch.randn(B, H, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    advantages = torch.randn(B, T, dtype=torch.float64)
    config = verl_actor_config(loss_agg_mode="seq-mean-token-mean")
    fn = core_algos.get_policy_loss_fn("sa_vcpo")

    previous_scale = None
    for step in range(2):
        old = -torch.rand(B, T, dtype=torch.float64) * 3  # stale behavior policy: ESS < 1
        opt.zero_grad()
        ref_opt.zero_grad()
        halves = [slice(0, 3), slice(3, 6)]  # two micro-batches, one optimizer step
        for rows in halves:
            lp = torch.log_softmax(model(x[rows]), -1)
            loss, metrics = fn(old[rows], lp, advantages[rows], mask[rows], "seq-mean-token-mean", config, None)
            (loss * len(range(*rows.indices(B))) / B).backward()
            ref_lp = torch.log_softmax(reference(x[rows]), -1)
            ref_batch = sa.PolicyBatch(
                logprobs=ref_lp, advantages=advantages[rows], mask=mask[rows], old_logprobs=old[rows]
            )
            ref_loss = sa.get_loss("vcpo", anchor="old")(ref_batch).loss  # the core directly: records nothing
            (ref_loss * len(range(*rows.indices(B))) / B).backward()
        if step == 1:  # the previous step's optimizer metrics ride along with the loss metrics
            assert metrics["vcpo/lr_scale"] == pytest.approx(previous_scale)
            assert "gac/grad_norm" in metrics and "gac/cos" not in metrics  # NaN on step 1: dropped
        with torch.no_grad():
            lam = (torch.log_softmax(model(x), -1) - old).masked_fill(~mask, 0).sum(-1)
        expected = sa.effective_sample_size(lam)
        assert opt.accumulator.num_records == 2  # this optimizer's own accumulator, one record per micro-batch
        opt.step()
        sched.step()
        scale = math.sqrt(expected.ess_ratio)
        assert 0 < expected.ess_ratio < 1
        assert opt.last_metrics["vcpo/ess_ratio"] == pytest.approx(expected.ess_ratio, rel=1e-12)
        assert opt.last_metrics["vcpo/lr_scale"] == pytest.approx(scale, rel=1e-12)
        assert opt.param_groups[0]["lr"] == 0.05  # the schedule's LR is restored
        for group in ref_opt.param_groups:
            group["lr"] = 0.05 * scale
        ref_opt.step()
        for group in ref_opt.param_groups:
            group["lr"] = 0.05
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        previous_scale = scale
        assert opt.accumulator.num_records == 0
    assert math.isfinite(opt.last_metrics["gac/cos"])  # second step: a previous gradient exists
    state = opt.state_dict()
    assert "ess_scaled_lr" in state and "stable_async_gac" in state


def test_optimizer_gac_skip_and_missing_ess():
    model = torch.nn.Linear(3, 1, bias=False)
    opt = adapter.StableOptimizer(model.parameters(), lr=0.1, inner="torch.optim.SGD", gac="skip", gac_threshold=0.0)
    for expected_skip in (False, True):
        opt.zero_grad()
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        with pytest.warns(UserWarning, match="no ess_ratio") if not expected_skip else _nullcontext():
            opt.step()  # no sa_ loss ran: ESS missing -> full LR (on_missing="base")
        moved = not torch.equal(before, model.weight)
        assert moved != expected_skip
    with pytest.raises(ValueError, match="inner"):
        adapter.StableOptimizer(model.parameters(), inner="torch.optim.NoSuchOptimizer")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_launch_script_overrides_compose_and_validate():
    import re
    import shlex
    from pathlib import Path

    from verl.utils.config import omega_conf_to_dataclass, validate_config

    script = Path(__file__).resolve().parents[2] / "integrations" / "verl" / "run_grpo_sa_vcpo.sh"
    text = script.read_text()
    body = text.split("verl.trainer.main_ppo", 1)[1].split('"$@"', 1)[0].replace("\\\n", " ")
    values = {"MODEL": "/tmp/model", "DATA": "/tmp/data", "NGPUS": "8"}
    overrides = [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], arg) for arg in shlex.split(body)]
    overrides = [o for o in overrides if not o.startswith("actor_rollout_ref.actor.strategy")]
    config = _compose([*overrides, "actor_rollout_ref.actor.strategy=fsdp2"])
    validate_config(config, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == "sa_vcpo"
    hp = adapter.resolve_hyperparameters("vcpo", actor)
    assert hp == {"aggregation": "seq-mean-token-mean", "anchor": "old", "ratio_cap": 8.0}
    sa.get_loss("vcpo", **hp)
