"""OpenRLHF's ``train_ppo_ray`` with stable-async's ``PolicyLoss`` in every Ray worker.

    python integrations/openrlhf/train_ppo_ray_sa.py \
        --sa.policy_loss dppo_binary_tv --sa.correction none --sa.ess_lr '{"rule": "sqrt"}' \
        -- <the usual openrlhf.cli.train_ppo_ray arguments>

What it does: ``ray.init(runtime_env=...)`` with ``worker_process_setup_hook`` =
``stable_async.integrations.openrlhf.worker_setup`` (so ``patch()`` runs in every worker before
OpenRLHF builds its actor), ``patch()`` in this driver too, then OpenRLHF's own CLI module as
``__main__`` with the remaining arguments. OpenRLHF skips its ``ray.init`` when Ray is already
initialized, so this script also sets the three environment variables OpenRLHF would.

``--sa.*`` options (all optional; without any, the run is OpenRLHF's loss computed by stable-async):
  --sa.policy_loss NAME       a registered stable-async loss (``stable-async`` CLI lists them)
  --sa.loss_kwargs JSON       its hyperparameters, e.g. '{"delta_high": 0.2}'
  --sa.correction JSON|none|openrlhf   a RolloutCorrection as a JSON dict, none, or OpenRLHF's translated (default)
  --sa.ess_lr JSON|true       ESS-scaled learning rate (ESSScaledLR arguments)
  --sa.gac JSON|true          gradient alignment control (GradientAlignmentControl arguments)
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys


def _json_or_word(value: str):
    words = {"none": False, "false": False, "true": True, "openrlhf": None}
    return words[value.lower()] if value.lower() in words else json.loads(value)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="OpenRLHF PPO with stable-async", allow_abbrev=False)
    parser.add_argument("--sa.policy_loss", dest="policy_loss", default=None)
    parser.add_argument("--sa.loss_kwargs", dest="loss_kwargs", type=json.loads, default=None)
    parser.add_argument("--sa.correction", dest="correction", type=_json_or_word, default=None)
    parser.add_argument("--sa.ess_lr", dest="ess_lr", type=_json_or_word, default=None)
    parser.add_argument("--sa.gac", dest="gac", type=_json_or_word, default=None)
    ours, openrlhf_args = parser.parse_known_args(argv)
    if openrlhf_args[:1] == ["--"]:
        openrlhf_args = openrlhf_args[1:]
    options = {k: v for k, v in vars(ours).items() if k == "correction" or (v is not None and v is not False)}

    import ray

    from stable_async.integrations import openrlhf as sa_openrlhf

    defaults = {  # what openrlhf.cli.train_ppo_ray passes to its own ray.init
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
    }
    runtime_env = sa_openrlhf.runtime_env({"env_vars": defaults}, **options)
    ray.init(runtime_env=runtime_env)
    sa_openrlhf.patch(**options)  # the driver too (covers actors pickled by value; needs vllm, as OpenRLHF does)
    print(f"stable-async: OpenRLHF PolicyLoss patched in every worker with {options}", flush=True)
    sys.argv = ["openrlhf.cli.train_ppo_ray", *openrlhf_args]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
