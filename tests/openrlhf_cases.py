"""Every `PolicyLoss` constructor combination OpenRLHF accepts (shared by the parity and adapter tests)."""

from __future__ import annotations

import itertools
from typing import Any

THRESHOLDS = {"ratio": (0.8, 1.25), "binary_kl": (0.0, 0.05), "tv": (0.0, 0.1)}
CLIP_EPS = {"ppo": (0.2, 0.28), "gspo": (0.05, 0.08)}


def accepted_combinations(policy_loss_cls: Any) -> list[dict]:
    """Constructor kwargs over loss type × dual clip × token level × IS level × mode × gating.

    A combination is kept when ``policy_loss_cls`` (OpenRLHF's own class) accepts it.
    """
    combos = []
    for loss_type, dual_clip, token_level, level, mode, gating in itertools.product(
        ("ppo", "gspo"), (None, 3.0), (True, False), ("off", "token", "seq"), ("mask", "clip"), THRESHOLDS
    ):
        kwargs = dict(
            clip_eps_low=CLIP_EPS[loss_type][0],
            clip_eps_high=CLIP_EPS[loss_type][1],
            dual_clip=dual_clip,
            token_level_loss=token_level,
            policy_loss_type=loss_type,
            is_correction_level=level,
            is_correction_mode=mode,
            is_correction_gating=gating,
            is_correction_threshold=THRESHOLDS[gating],
        )
        try:
            policy_loss_cls(**kwargs)
        except ValueError:
            continue
        combos.append(kwargs)
    return combos


def combo_id(kwargs: dict) -> str:
    """A readable test id for one combination."""
    parts = [
        kwargs["policy_loss_type"],
        "dual" if kwargs["dual_clip"] else "nodual",
        "tok" if kwargs["token_level_loss"] else "seq",
    ]
    return "-".join(
        [*parts, kwargs["is_correction_level"], kwargs["is_correction_mode"], kwargs["is_correction_gating"]]
    )
