"""Garbage collections are timed once per process, whatever the number of apps built in it."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from shared.observability import watch_gc


def _collections(generation: int) -> float:
    return REGISTRY.get_sample_value("vrs_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_every_collection_is_timed_by_one_callback_however_often_it_is_installed() -> None:
    watch_gc()
    watch_gc()
    assert sum(getattr(c, "__name__", "") == "_gc_timer" for c in gc.callbacks) == 1
    before = _collections(2)
    gc.collect()
    assert _collections(2) == before + 1
