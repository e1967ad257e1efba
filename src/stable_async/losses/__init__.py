"""Registered losses, one module per family. Importing this package registers every loss."""

from stable_async.losses import (  # noqa: F401  (imported to register)
    cispo,
    geo_mean,
    gspo,
    ppo,
    reinforce,
    sapo,
)
