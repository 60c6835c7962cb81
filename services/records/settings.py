from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import BusSettings, ServiceSettings, sqlite_url


class RecordsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_RECORDS_", extra="ignore")

    # The main database holds the shard map; doses, idempotency keys and the outbox live in the shards.
    main_dsn: str = Field(default_factory=lambda: sqlite_url("records/main.db"))
    shard_dsns: dict[str, str] = Field(
        default_factory=lambda: {name: sqlite_url(f"records/shard-{name}.db") for name in ("s0", "s1")}
    )
    pool_size: int = 20
    registry_url: str = "http://127.0.0.1:8001"
    bus: BusSettings = Field(default_factory=BusSettings)
    # Coupon holders are cached briefly; a coupon nobody holds is never cached, so a resident registered a
    # moment ago is matched at once.
    coupon_cache_seconds: float = 30.0
    run_relay: bool = True
    relay_batch_size: int = 500
    relay_idle_seconds: float = 0.2
    # Commits within this window are published together: fewer, fuller passes under load, a little more lag.
    relay_linger_seconds: float = 0.02
    max_batch_doses: int = 1000
