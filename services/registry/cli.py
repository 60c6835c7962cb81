"""registry's ``vrs`` subcommands."""

from __future__ import annotations

import asyncio

from services.registry.models import outbox
from services.registry.settings import RegistrySettings
from shared.outbox import run_relay_process


def relay() -> None:
    """``vrs relay registry``: publish registry's outbox to ``coupon-events``."""
    settings = RegistrySettings()
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.coupon_topic))
