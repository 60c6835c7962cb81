"""Settings shared by every service.

Each service has one pydantic-settings class with its own env prefix (``VRS_REGISTRY_``, ...). What every
service must agree on — the signing key, the event bus — lives in small classes with prefixes of their own
(``VRS_AUTH_``, ``VRS_BUS_``) so that one Kubernetes secret or config map can feed all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["development", "test", "production"]

# Well-known development secret; refused outside development and test.
DEV_JWT_SECRET = "vrs-dev-secret-do-not-use-in-production-0123456789"  # noqa: S105


def var_dir() -> Path:
    """Where the embedded mode keeps its files (``VRS_VAR_DIR``, default ``./var``)."""
    import os

    return Path(os.environ.get("VRS_VAR_DIR", "var")).resolve()


def sqlite_url(relative: str) -> str:
    path = var_dir() / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{path}"


class AuthSettings(BaseSettings):
    """JWT verification, shared by the gateway and every service (``VRS_AUTH_``)."""

    model_config = SettingsConfigDict(env_prefix="VRS_AUTH_", extra="ignore")

    environment: Environment = Field(default="development", validation_alias="VRS_ENVIRONMENT")
    jwt_secret: str = DEV_JWT_SECRET
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_issuer: str = "vrs-dev"
    jwks_url: str | None = None
    token_ttl_seconds: int = 3600
    # Verified tokens remembered by their raw header value (0 turns the cache off), each for at most this long
    # so that a rotated key takes effect.
    token_cache_size: int = Field(default=10_000, ge=0)
    token_cache_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> AuthSettings:
        if self.environment == "production" and self.jwt_secret == DEV_JWT_SECRET and not self.jwks_url:
            raise ValueError("VRS_AUTH_JWT_SECRET must be set in production (the development key is public)")
        return self


class BusSettings(BaseSettings):
    """The event bus: its topics and how to reach it (``VRS_BUS_``)."""

    model_config = SettingsConfigDict(env_prefix="VRS_BUS_", extra="ignore")

    kind: Literal["embedded", "kafka"] = "embedded"
    topic: str = "dose-events"  # records → stats
    coupon_topic: str = "coupon-events"  # registry → records
    partitions: int = Field(default=4, ge=1)
    embedded_path: Path = Field(default_factory=lambda: var_dir() / "events" / "log.db")
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_client_id: str = "vrs"
    # "SSL": TLS to the brokers, and a client certificate when certfile/keyfile are set (a Strimzi KafkaUser
    # with tls authentication; PEM files mounted from its secret, the CA from the cluster's CA secret).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None


class ServiceSettings(BaseSettings):
    """Fields every service has; subclasses set the env prefix."""

    model_config = SettingsConfigDict(extra="ignore")

    environment: Environment = Field(default="development", validation_alias="VRS_ENVIRONMENT")
    log_level: str = "INFO"
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # Worker processes (relays, consumers) have no HTTP server: they serve /metrics on this port when set.
    # The API processes serve /metrics on their own port and ignore it.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)


class PublisherSettings(ServiceSettings):
    """A service that publishes events through its outbox (registry, records)."""

    main_dsn: str
    shard_dsns: dict[str, str]
    bus: BusSettings = Field(default_factory=BusSettings)
    # Run the outbox relay inside the API process (the embedded default); in production it runs as a
    # process of its own (``vrs relay <service>``) and the API replicas set this to false.
    run_relay: bool = True
    relay_batch_size: int = Field(default=500, ge=1)
    relay_idle_seconds: float = Field(default=0.2, gt=0)
    # Commits within this window are published together: fewer, fuller passes under load, a little more lag.
    relay_linger_seconds: float = Field(default=0.02, ge=0)
