"""Registered losses, one module per family. Importing this package registers every loss."""

from stable_async.losses import (  # noqa: F401  (imported to register)
    cispo,
    cov,
    decoupled_ppo,
    delight,
    dppo,
    geo_mean,
    gspo,
    luspo,
    m2po,
    ppo,
    prime_rl,
    reinforce,
    sapo,
    vcpo,
    vespo,
)
