"""The cyclic garbage collector, set for processes whose requests hold thousands of young objects at once."""

from __future__ import annotations

import gc

# The cyclic collector's first threshold: tracked objects allocated (net) before a young collection. Python's
# 700 suits a program whose objects die young; a dose batch holds ~50,000 of them for its whole request (its
# 1,000 items, their facts, rows, events and answers), so every collection found thousands alive, walked them and
# promoted them, and the older generations' collections walked them again. In records under batches that was
# 1.6-1.8 s of collections in 15 s of one process (a sixth of its CPU), 0.5 s of it in full collections of ~50 ms
# each (vrs_gc_pause_seconds). With 100,000 most of a request's objects are freed before any collection sees
# them; the heap grows by at most that many objects.
YOUNG_OBJECTS = 100_000
_PYTHONS = gc.get_threshold()


def settle_heap() -> None:
    """Once a process has built what it keeps for its life (code, schemas, pools, clients): those objects out of
    the collector's way (``gc.freeze``: a full collection of the ~170,000 a service imports took 40-90 ms, and
    stats' full collections under batches 166 ms each), and young collections only every :data:`YOUNG_OBJECTS`
    allocations. Every service does it once started (``shared.app.build_app``), every worker process once set up
    (``shared.observability.setup_worker``). No collection first: the little garbage of imports stays frozen, and
    a process that starts apps again and again (the tests: a fifth longer with one) does not walk its heap each
    time."""
    gc.freeze()
    gc.set_threshold(YOUNG_OBJECTS, 10, 10)


def unsettle_heap() -> None:
    """On stopping: the collector as Python set it (an app started again in the same process, as the tests do,
    settles what it then holds)."""
    gc.unfreeze()
    gc.set_threshold(*_PYTHONS)
