from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.dev_keys import is_development_key
from shared.grants import DEV_PUBLIC_KEY
from shared.settings import PublisherSettings, sqlite_url


class RecordsSettings(PublisherSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_RECORDS_", extra="ignore")

    # The main database holds the shard map; doses, idempotency keys and the outbox live in the shards.
    main_dsn: str = Field(default_factory=lambda: sqlite_url("records/main.db"))
    shard_dsns: dict[str, str] = Field(
        default_factory=lambda: {name: sqlite_url(f"records/shard-{name}.db") for name in ("s0", "s1")}
    )
    pool_size: int = 20
    # Consume ``coupon-events`` into the coupon projection inside the API process (the embedded default); in
    # production a process of its own (``vrs consume records``) and the API replicas set this to false.
    run_consumer: bool = True
    consumer_name: str = Field(default="records-coupons", min_length=1, max_length=64)
    poll_max_records: int = Field(default=500, ge=1, le=10_000)
    poll_timeout_seconds: float = Field(default=1.0, gt=0)
    # A coupon-event batch locks the doses it moves until it commits; past this many doses, or as many as the
    # last batches moved in coupon_batch_max_seconds, it commits and takes the rest of what it polled in the
    # next transaction (a municipality correcting one of those doses waits for one transaction, not for a
    # whole backlog). See services/records/consumer.py, DoseBudget.
    coupon_batch_max_doses: int = Field(default=2000, ge=1)
    coupon_batch_max_seconds: float = Field(default=0.25, gt=0)
    max_batch_doses: int = 1000
    # Dose CSV imports: processed in the API process (each replica leases whole imports), in chunks of rows.
    run_imports: bool = True
    import_chunk_rows: int = Field(default=1000, ge=1, le=1000)
    max_import_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # Idempotency keys (a single dose's header, a batch item's or a CSV row's client_id) answer a retry with the
    # first answer for this many days, then are deleted; a retry after that is recorded as new and, being the
    # same dose, answered as a duplicate of the first (nothing is stored twice). Every replica looks every
    # key_expiry_seconds (0: never); one at a time deletes (services/records/housekeeping.py).
    idempotency_keep_days: int = Field(default=30, ge=1)
    key_expiry_seconds: float = Field(default=600, ge=0)
    # ES256 public key (PEM) of registry's transfer-lookup grants (see shared/grants.py).
    transfer_grant_public_key: str = DEV_PUBLIC_KEY

    @model_validator(mode="after")
    def _check_grant_key(self) -> RecordsSettings:
        if self.environment == "production" and is_development_key(self.transfer_grant_public_key, DEV_PUBLIC_KEY):
            raise ValueError("the development transfer-grant key is refused in production")
        return self
