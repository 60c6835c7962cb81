from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import BusSettings, ServiceSettings, sqlite_url

POPULATION_FILE = "population/prefecture-population-2021-01-01.csv"


def _default_population_path() -> Path:
    # The team's data folder beside the checkout (or VRS_SHARED_DATA), read in place, never copied.
    override = os.environ.get("VRS_SHARED_DATA")
    root = Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return root / POPULATION_FILE


class StatsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_STATS_", extra="ignore")

    main_dsn: str = Field(default_factory=lambda: sqlite_url("stats/main.db"))
    pool_size: int = 20
    bus: BusSettings = Field(default_factory=BusSettings)
    # The name the consumer's positions and processed event ids are stored under. Two deployments that
    # share a database (a rebuild beside the live one) need different names.
    consumer_name: str = Field(default="stats", min_length=1, max_length=64)
    # Off for API-only replicas (run consumers with `vrs consume stats` then, as many as there are partitions).
    run_consumer: bool = True
    # Share the partitions with the other consumers of this name (Kafka consumer group; embedded: a lease).
    consumer_group: bool = True
    # Processed event ids are forgotten only when both this many messages behind their partition's committed
    # offset and older than this (see shared.consumer.Bookkeeping.prune); looked at every prune_interval_seconds.
    processed_keep_offsets: int = Field(default=1_000_000, ge=0)
    processed_keep_seconds: float = Field(default=7 * 24 * 3600, ge=0)
    prune_interval_seconds: float = Field(default=300, gt=0)
    poll_max_records: int = Field(default=500, ge=1, le=10_000)
    poll_timeout_seconds: float = Field(default=1.0, gt=0)
    poll_linger_seconds: float = Field(default=0.05, ge=0, le=1)
    retry_initial_seconds: float = Field(default=0.5, gt=0)
    retry_max_seconds: float = Field(default=30.0, gt=0)
    # Fine cuts (municipality, vaccine) for callers other than national users hide counts below this
    # (10: counts 1-9 are suppressed); 0 turns suppression off. See service.suppression_for.
    small_cell_threshold: int = Field(default=10, ge=0)
    # Answers of /api/v1/stats/doses and /coverage kept per process until the aggregates change (0: none).
    answer_cache_entries: int = Field(default=512, ge=0)
    # Rows per page of GET /api/v1/stats/doses: the default and the most a caller may ask for.
    max_cut_rows: int = Field(default=50_000, ge=1)
    # The denominators of the coverage rates (see services/stats/population.py).
    population_path: Path = Field(default_factory=_default_population_path)
    # The dashboard's chart library, installed from npm by `npm ci --prefix services/stats/web`.
    echarts_path: Path = Field(
        default_factory=lambda: Path(__file__).resolve().parent / "web/node_modules/echarts/dist/echarts.min.js"
    )
