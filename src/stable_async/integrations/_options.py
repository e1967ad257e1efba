"""Former home of `option_settings`; the public module is `stable_async.integrations.options`."""

from stable_async.integrations.options import option_settings

__all__ = ["option_settings"]
