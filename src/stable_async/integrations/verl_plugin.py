"""Entry point of ``pip install stable-async[verl]``: veRL calls `load` on ``import verl``, in every process.

``pyproject.toml`` declares ``[project.entry-points."verl.plugins"] stable_async =
"stable_async.integrations.verl_plugin:load"``. veRL 0.9.1 resolves every entry point of that
group at the end of ``verl/__init__.py`` with ``EntryPoint.load()``, which *imports this module
and looks up* ``load`` but does not call it: so importing this module registers the losses (the
last line below), and `load` is the same, idempotent, for explicit use. veRL logs a failing
plugin only at *debug* level, so a broken
install would silently leave ``loss_mode=sa_*`` unknown ("Unsupported loss mode") much later.
`load` therefore logs any failure at ERROR level itself, and under ``STABLE_ASYNC_STRICT=1``
raises `StrictPluginFailure` (a ``BaseException``, which veRL's ``except Exception`` does not
swallow), aborting ``import verl``.

Besides the losses, `load` installs two environment pieces: with TRL installed,
`stable_async.integrations.verl_trl_shim` (veRL 0.9.1's value-head patch fails to import from
TRL ≥ 1.x); with ``VERL_PLATFORM=cpu``, the CPU platform of `stable_async.integrations.verl_cpu`.
Otherwise: imports the adapter (which imports ``verl.trainer.ppo.core_algos``, already loaded by
most veRL entry points), fills the policy-loss registry, and wraps the actor worker's
``update_actor`` / ``update_weights`` (`stable_async.integrations.verl_worker_hooks`: GAC's
rollout batches, the policy versions), which imports ``verl.workers.engine_workers`` (about 1 s
of CPU; veRL's driver and actor workers import it anyway).
"""

from __future__ import annotations

import logging
import sys

from stable_async.integrations.verl_strict import STRICT_ENV, StrictPluginFailure, strict_mode

logger = logging.getLogger("stable_async.integrations.verl")


def _install_environment_pieces() -> None:
    """The TRL shim (when TRL is installed) and the CPU platform (when ``VERL_PLATFORM=cpu``)."""
    from stable_async.integrations import verl_cpu, verl_trl_shim

    if verl_trl_shim.trl_installed():
        verl_trl_shim.install()
    verl_cpu.register_if_requested()


def load() -> list[str]:
    """Register every stable-async loss in veRL as ``sa_<name>``; idempotent. Returns the registered names."""
    try:
        _install_environment_pieces()
        importing = sys.modules.get("stable_async.integrations.verl")
        if importing is not None and not hasattr(importing, "register_all"):
            # The adapter is being imported (its import of veRL brought us here); it registers at its end.
            return []
        from stable_async.integrations import verl as adapter

        return adapter.register_all()
    except StrictPluginFailure:
        raise  # register_all already logged each failure at ERROR level
    except Exception as exc:
        logger.error(
            "stable-async: the veRL plugin failed to load (%s: %s); loss modes sa_* are NOT registered. "
            "Set %s=1 to make this fatal.",
            type(exc).__name__,
            exc,
            STRICT_ENV,
        )
        if strict_mode():
            raise StrictPluginFailure(f"stable-async veRL plugin failed: {type(exc).__name__}: {exc}") from exc
        return []


# veRL's loader imports this module and never calls `load`: register on import.
REGISTERED: list[str] = load()
