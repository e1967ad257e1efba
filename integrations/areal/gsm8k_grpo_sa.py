"""AReaL 1.0.4's GSM8K GRPO example with a stable-async loss in place of its actor loss.

Run it the way AReaL runs its own example (GPUs, AReaL's launcher and inference server), e.g.

    python -m areal.launcher.local integrations/areal/gsm8k_grpo_sa.py \
        --config integrations/areal/gsm8k_grpo_sa.yaml

`use_loss` swaps ``areal.trainer.ppo.actor.grpo_loss_fn`` in this process: the process that
runs the actor. AReaL's ``PPOActor`` then binds our function with its usual arguments
(``eps_clip``, ``c_clip``, ``rejection_sampling``, ``m2_threshold``, ``prox_logp_method``, the
policy version). ``STABLE_ASYNC_LOSS`` picks the loss (default ``decoupled_ppo``).
"""

from __future__ import annotations

import os
import runpy
import sys

from stable_async.integrations import areal as sa_areal


def main() -> None:
    sa_areal.use_loss(os.environ.get("STABLE_ASYNC_LOSS", "decoupled_ppo"))
    # AReaL's own example script, unchanged: from AReaL's repository at the release you installed
    # (it is not in the wheel); each rank runs it, so the swap above happens where the actor runs.
    example = os.environ.get("AREAL_GSM8K_GRPO", "examples/math/gsm8k_grpo.py")
    sys.argv = [example, *sys.argv[1:]]
    runpy.run_path(example, run_name="__main__")


if __name__ == "__main__":
    main()
