"""Optimizer-side stabilizers: ESS-scaled learning rate (VCPO) and gradient alignment control (GAC)."""
