"""Thin adapters for TRL, veRL and OpenRLHF; each is imported only when used (no trainer import here)."""
