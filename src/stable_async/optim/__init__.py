"""Optimizer-side stabilizers: ESS-scaled learning rate (VCPO) and gradient alignment control (GAC)."""

from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl

__all__ = ["ESSScaledLR", "GradientAlignmentControl"]
