"""Optimizer-side stabilizers: ESS-scaled learning rate (VCPO), gradient alignment control (GAC),
the per-optimizer step accumulator and the step that combines them."""

from stable_async.optim.accumulator import StepAccumulator, StepStatistics
from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl
from stable_async.optim.step import StableStep

__all__ = ["ESSScaledLR", "GradientAlignmentControl", "StableStep", "StepAccumulator", "StepStatistics"]
