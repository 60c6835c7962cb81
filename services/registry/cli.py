"""registry's ``vrs`` subcommands."""

from __future__ import annotations

import asyncio

from services.registry.models import outbox
from services.registry.settings import RegistrySettings
from shared.observability import setup_worker
from shared.outbox import run_relay_process


def relay() -> None:
    """``vrs relay registry``: publish registry's outbox to ``coupon-events``."""
    settings = RegistrySettings()
    setup_worker(service="registry-relay", log_level=settings.log_level, metrics_port=settings.metrics_port)
    asyncio.run(run_relay_process(settings, outbox, topic=settings.bus.coupon_topic))
