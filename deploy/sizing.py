"""The sizing arithmetic of deploy/README.md, from the measured figures: change an input, run it again.

    python deploy/sizing.py            # prints the tables pasted into deploy/README.md, "Sizing"

Every input is a named constant below with where it comes from. Nothing here is measured at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- Measured (README "Performance", `make bench`, 2-core machine, 2026-11-24) --------------------------
MACHINE_CORES = 2
SINGLE_DOSES_PER_S = 205  # POST /api/v1/doses through the gateway, whole stack on the machine
RECORDS_CORES_AT_SINGLE = 0.8  # records' CPU while doing SINGLE_DOSES_PER_S
BATCH_DOSES_PER_S = 2_000  # batches of 500 through the gateway, whole stack
CEILING_PER_S = 2_512  # bare FastAPI + one asyncpg INSERT per request, same generator
CEILING_BEHIND_GATEWAY_PER_S = 1_668  # the same behind the gateway
EVENT_BYTES = 387  # one dose.recorded event as published (tests/factories.py recorded().to_bytes())

# --- Assumed (not measured by make bench; replace when measured) -----------------------------------------
HPA_TARGET = 0.70  # HorizontalPodAutoscaler CPU target: pods run at 70 % at the design rate
POD_CPU_REQUEST = 1.0  # records and gateway pods request 1 core (base/apps); the HPA's 70 % is of that
WORKING_HOURS = 9  # doses are given 09:00-18:00: the day's doses arrive in 9 hours, not 24
BURST = 10  # bursts of 10x the average (the brief)
EVENTS_PER_DOSE = 1.1  # dose.recorded, plus matched / corrected / voided for some
DOSE_ROW_BYTES = 1_000  # records: dose + idempotency key + history share + indexes, per dose
RESIDENT_ROW_BYTES = 1_000  # registry: resident + coupon + sealed My Number + indexes, per resident
DIRECTORY_ROW_BYTES = 300  # registry main: the My Number directory entry + index, per resident
DOSES_PER_SHARD_PER_S = 500  # what one PostgreSQL primary is asked to take (about 4 row writes each)
POOL_PER_POD = 8  # VRS_<SERVICE>_POOL_SIZE in prod; up to as many again are opened under load (and kept)
MAX_CONNECTIONS = 400  # cluster-defaults.yaml max_connections


@dataclass(frozen=True)
class Country:
    name: str
    doses_per_day: int
    residents: int
    campaign_doses: int  # every dose of the campaign: what the topic and records keep forever


JAPAN = Country("Japan", 1_700_000, 126_000_000, 440_000_000)
INDIA = Country("India", 25_000_000, 1_400_000_000, 2_200_000_000)

# Derived per-dose costs (core-seconds).
RECORDS_CORE_S_PER_DOSE = RECORDS_CORES_AT_SINGLE / SINGLE_DOSES_PER_S
STACK_CORE_S_PER_DOSE = MACHINE_CORES / SINGLE_DOSES_PER_S
STACK_CORE_S_PER_BATCHED_DOSE = MACHINE_CORES / BATCH_DOSES_PER_S
GATEWAY_CORE_S_PER_REQUEST = MACHINE_CORES * (1 / CEILING_BEHIND_GATEWAY_PER_S - 1 / CEILING_PER_S)


def rates(country: Country) -> dict[str, float]:
    day_average = country.doses_per_day / 86_400
    working_average = country.doses_per_day / (WORKING_HOURS * 3600)
    return {
        "average over 24 h": day_average,
        f"burst: {BURST}x the 24 h average": BURST * day_average,
        f"average over {WORKING_HOURS} working hours": working_average,
        f"design: {BURST}x the working-hours average": BURST * working_average,
    }


def plan(country: Country) -> dict[str, str]:
    rate = rates(country)[f"design: {BURST}x the working-hours average"]
    records_cores = rate * RECORDS_CORE_S_PER_DOSE / HPA_TARGET
    gateway_cores = rate * GATEWAY_CORE_S_PER_REQUEST / HPA_TARGET
    stack_cores = rate * STACK_CORE_S_PER_DOSE / HPA_TARGET
    shards = max(2, math.ceil(rate / DOSES_PER_SHARD_PER_S))
    records_pods = max(3, math.ceil(records_cores / POD_CPU_REQUEST))
    gateway_pods = max(3, math.ceil(gateway_cores / POD_CPU_REQUEST))
    connections = records_pods * 2 * POOL_PER_POD + 2 * 2 * POOL_PER_POD + 2 * POOL_PER_POD  # + relays, consumer
    topic_gb = country.campaign_doses * EVENTS_PER_DOSE * EVENT_BYTES / 1e9
    records_gb = country.campaign_doses * DOSE_ROW_BYTES / 1e9
    registry_gb = country.residents * RESIDENT_ROW_BYTES / 1e9
    directory_gb = country.residents * DIRECTORY_ROW_BYTES / 1e9

    def cpu(core_s: float, cores: float) -> str:
        return f"{rate:,.0f} x {core_s * 1000:.2f} ms / {HPA_TARGET} = {cores:,.1f}"

    return {
        "design rate (single doses/s)": f"{rate:,.0f}",
        "records CPU (cores, at 70 %)": cpu(RECORDS_CORE_S_PER_DOSE, records_cores),
        "records pods (1 core requested, >= 3)": f"{records_pods}",
        "gateway CPU (cores, at 70 %)": cpu(GATEWAY_CORE_S_PER_REQUEST, gateway_cores),
        "gateway pods (1 core requested, >= 3)": f"{gateway_pods}",
        "whole stack, upper bound (cores)": cpu(STACK_CORE_S_PER_DOSE, stack_cores),
        "same day in batches (cores for 24 h avg)": (
            f"{country.doses_per_day / 86_400:,.0f} x {STACK_CORE_S_PER_BATCHED_DOSE * 1000:.1f} ms = "
            f"{country.doses_per_day / 86_400 * STACK_CORE_S_PER_BATCHED_DOSE:,.2f}"
        ),
        "records shards": f"max(2, {rate:,.0f} / {DOSES_PER_SHARD_PER_S}) = {shards}",
        "registry shards": f"{shards}: {registry_gb / shards:,.0f} GB of residents each",
        "stats consumers into one stats database": (
            f"{rate * EVENTS_PER_DOSE:,.0f} events/s to apply (not measured by make bench)"
        ),
        "connections per records shard": (
            f"{records_pods} pods x {2 * POOL_PER_POD} + relays 2 x {2 * POOL_PER_POD} + consumer "
            f"{2 * POOL_PER_POD} = {connections} (max_connections {MAX_CONNECTIONS})"
        ),
        "dose-events stream (MB/s at design rate)": f"{rate * EVENTS_PER_DOSE * EVENT_BYTES / 1e6:,.2f}",
        "dose-events kept forever (GB per copy)": f"{topic_gb:,.0f} (x3 replicas = {3 * topic_gb:,.0f})",
        "records data (GB, all shards)": f"{records_gb:,.0f} = {records_gb / shards:,.0f} per shard",
        "registry data (GB)": f"{registry_gb:,.0f} in shards + {directory_gb:,.0f} directory in main",
    }


def main() -> None:
    print("Derived costs")
    print(f"  records, per single dose:        {RECORDS_CORE_S_PER_DOSE * 1000:.1f} core-ms")
    print(f"  whole stack, per single dose:    {STACK_CORE_S_PER_DOSE * 1000:.1f} core-ms")
    print(f"  whole stack, per batched dose:   {STACK_CORE_S_PER_BATCHED_DOSE * 1000:.1f} core-ms")
    print(f"  gateway, per request:            {GATEWAY_CORE_S_PER_REQUEST * 1000:.2f} core-ms")
    for country in (JAPAN, INDIA):
        print(f"\n{country.name}: {country.doses_per_day:,} doses/day")
        for label, value in rates(country).items():
            print(f"  {label:<44} {value:>10,.0f} doses/s")
        for label, text in plan(country).items():
            print(f"  {label:<44} {text}")


if __name__ == "__main__":
    main()
