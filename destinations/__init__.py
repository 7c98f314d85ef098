"""Delivery destinations. Built-ins are listed in ``firehose.registry.BUILTIN_DESTINATIONS``."""
