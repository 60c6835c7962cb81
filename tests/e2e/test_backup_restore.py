"""Backup and restore under load: a records shard and a registry shard are backed up while doses and resident
changes keep coming, their clusters are then lost (server killed, data directory deleted) and restored into
fresh clusters from the base backup and the WAL streamed since — registry's first, then, after residents of the
lost shard changed in registry, records' — so records replays ``coupon-events`` from the offsets stored in the
restored shard; stats is rebuilt from ``dose-events``, and the books must balance:

- the doses the client was told are stored are exactly the live doses in records (none lost, none extra),
  including those accepted after the base backup, which exist only in the WAL;
- stats equals records cell by cell, and applied exactly the dose events records wrote;
- records' coupon projection equals registry's coupons (same version for every coupon).

The deployment this stands for is in deploy/README.md ("Backup and restore").
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from devtools import soak
from devtools.soak import Client, Coupon, Ledger, System

# 131016 lives on shard s0 (see shared.db.Databases.default_shard); 011002 and 271004 on s1.
LOST = ("records_s0", "registry_s0")
ON_LOST_SHARD = "131016"


def coupons() -> list[Coupon]:
    return [
        Coupon(m, f"{i:09d}{i % 10}", f"drill-{i:04d}")
        for i, m in zip(range(1, 91), soak.MUNICIPALITIES * 30, strict=True)
    ]


async def run_load(client: Client, people: list[Coupon]) -> list[asyncio.Future[None]]:
    for coupon in people[:60]:  # the other 30 are registered during the load: their doses get matched then
        await soak.put_resident(client, coupon)
    load = [soak.single_doses(client, people) for _ in range(3)]
    load += [soak.batches(client, people), soak.corrections(client), soak.resident_changes(client, people)]
    return [asyncio.ensure_future(task) for task in load]


def stop_servers(system: System) -> None:
    for server in system.placement.values():
        server.stop()


def stats_rebuild(system: System) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "stats", "rebuild"],
        env=system.stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.usefixtures("pg_bindir", "kafka_lib")
async def test_a_lost_shard_is_restored_into_a_fresh_cluster_and_nothing_is_lost(server_dir: Path) -> None:
    with contextlib.ExitStack() as cleanup:
        system = await asyncio.to_thread(soak.start_system, server_dir, cleanup, streamed=LOST)
        cleanup.callback(stop_servers, system)  # the restored clusters (start_system stops the others)
        ledger, stop = Ledger(), asyncio.Event()
        people = coupons()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            client = Client(session, system.stack.url(), ledger, stop)
            tasks = await run_load(client, people)
            await asyncio.sleep(3)

            # The nightly base backup, taken while the load goes on.
            for database in LOST:
                await asyncio.to_thread(system.server(database).base_backup, server_dir / f"{database}-base")
            after_backup = set(ledger.accepted)
            await asyncio.sleep(4)

            # The disks of both clusters are lost; the load goes on (requests for them fail and are retried).
            for database in LOST:
                await asyncio.to_thread(system.lose_cluster, database)
            at_loss = set(ledger.accepted)
            only_in_wal = {d for d in at_loss - after_backup if ledger.accepted[d] == ON_LOST_SHARD}
            await asyncio.sleep(1)

            started = time.monotonic()
            await asyncio.to_thread(system.restore_clusters, {"registry_s0": server_dir / "registry_s0-base"})
            # registry is back, records' shard is not: these changes reach its projection only by the replay
            # of coupon-events from the offsets stored in the restored shard.
            changed = [c for c in people if c.municipality == ON_LOST_SHARD][:5]
            for coupon in changed:
                coupon.sex = "M" if coupon.sex != "M" else "F"
                await soak.put_resident(client, coupon)
            await asyncio.to_thread(system.restore_clusters, {"records_s0": server_dir / "records_s0-base"})
            restore_seconds = time.monotonic() - started
            await asyncio.sleep(2)  # and writes land in the restored clusters
            stop.set()
            await asyncio.gather(*tasks)

        rebuilt = await asyncio.to_thread(stats_rebuild, system)
        drain_seconds = await soak.drain(system, timeout=60)

        live, told = soak.records_live(system), ledger.live()
        assert only_in_wal, "no dose reached the lost shard between the base backup and the loss"
        versions = soak.coupon_versions(system, "records")
        assert all((c.municipality, c.number) in versions for c in changed)
        assert told - live == set(), f"lost: {sorted(told - live)[:10]}"
        assert live - told == set(), f"in records, never accepted: {sorted(live - told)[:10]}"
        assert ledger.replay_mismatches == 0
        assert soak.records_cells(system) == soak.stats_cells(system)
        assert soak.events_written(system) == soak.events_applied(system)
        assert soak.coupon_versions(system, "registry") == soak.coupon_versions(system, "records")
        assert soak.backlog(system) == 0
        on_lost = sum(1 for d in live if ledger.accepted[d] == ON_LOST_SHARD)
        print(
            f"\n{len(told)} live doses ({on_lost} on the lost shard, {len(only_in_wal)} of them only in the WAL "
            f"at the loss); {ledger.resident_changes} resident changes; restore {restore_seconds:.1f} s; "
            f"{rebuilt.strip()}; drained in {drain_seconds:.1f} s; retried: {Counter(w for _, w in ledger.failures)}"
        )
