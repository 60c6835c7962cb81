"""Settings shared by every service.

Each service has one pydantic-settings class with its own env prefix (``VRS_REGISTRY_``, ...). What every
service must agree on — the gateway's public keys, the event bus — lives in small classes with prefixes of their own
(``VRS_AUTH_``, ``VRS_BUS_``) so that one Kubernetes secret or config map can feed all four.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["development", "test", "production"]

# Kubernetes sets this in every container: how a deployment is recognised (see ServiceSettings).
DEPLOYMENT_MARKER = "KUBERNETES_SERVICE_HOST"


def _dev_gateway_jwks() -> str:
    from shared.dev_keys import DEV_GATEWAY_JWK, jwks_of

    return json.dumps(jwks_of(DEV_GATEWAY_JWK))


def var_dir() -> Path:
    """Where the embedded mode keeps its files (``VRS_VAR_DIR``, default ``./var``)."""
    return Path(os.environ.get("VRS_VAR_DIR", "var")).resolve()


def sqlite_url(relative: str) -> str:
    path = var_dir() / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{path}"


class AuthSettings(BaseSettings):
    """How the services verify the gateway's internal tokens (``VRS_AUTH_``); the same in all four.

    Only public keys: no service holds a key that could sign a token it would accept.
    """

    model_config = SettingsConfigDict(env_prefix="VRS_AUTH_", extra="ignore")

    # The gateway's public keys as a JWKS document; two during a rotation of the gateway's key.
    gateway_jwks: str = Field(default_factory=_dev_gateway_jwks)
    internal_issuer: str = "vrs-gateway"
    internal_audience: str = "vrs-services"
    # Internal tokens live minutes, not hours: a leaked one is worth little.
    internal_token_max_seconds: int = Field(default=300, gt=0, le=3600)
    clock_skew_seconds: int = Field(default=30, ge=0, le=300)
    # Verified internal tokens remembered by their raw header value (0 turns the cache off).
    token_cache_size: int = Field(default=10_000, ge=0)

    @model_validator(mode="after")
    def _keys_parse(self) -> AuthSettings:
        from shared.auth import Keyset

        if not len(Keyset.from_jwks(self.gateway_jwks)):  # a malformed JWKS stops the service here
            raise ValueError("VRS_AUTH_GATEWAY_JWKS holds no usable signing key")
        return self

    def holds_development_key(self) -> bool:
        from shared.dev_keys import is_development_jwk

        return any(is_development_jwk(k) for k in json.loads(self.gateway_jwks)["keys"])


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
    # How long a group member that stopped (killed, hung) keeps its partitions before others take them:
    # the Kafka consumer group's session timeout, the embedded log's lease.
    group_session_seconds: float = Field(default=10.0, ge=1)
    # A consumer's fetch waits on the broker until this many bytes are there or kafka_fetch_max_wait_ms has
    # passed (Kafka's own defaults: answered at the first message, an idle fetch every 500 ms). Every batch
    # costs its consumer a transaction, so a larger minimum makes fuller batches below full speed, for up to
    # the wait in lag. On the 2-core bench at ~280 doses/s: 16 KiB / 500 ms took stats' consumer from 0.26-0.29
    # cores to 0.12-0.13 (the machine 0.05 less in all); 64 KiB / 100 ms saved stats 0.11 but its idle
    # consumers, fetching five times as often, cost the broker and records as much. The defaults stay Kafka's:
    # below full speed a dose would reach the dashboard up to half a second later.
    kafka_fetch_min_bytes: int = Field(default=1, ge=1)
    kafka_fetch_max_wait_ms: int = Field(default=500, ge=0, le=5000)
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

    @model_validator(mode="after")
    def _environment_named_in_a_deployment(self) -> ServiceSettings:
        # In a deployment the development default would accept development keys: it must be said out loud.
        if "environment" not in self.model_fields_set and os.environ.get(DEPLOYMENT_MARKER):
            raise ValueError(f"VRS_ENVIRONMENT must be set in a deployment ({DEPLOYMENT_MARKER} is set)")
        if self.environment == "production" and self.auth.holds_development_key():
            raise ValueError("VRS_AUTH_GATEWAY_JWKS holds a development key, refused in production")
        return self


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
    # A relay's pass starts no sooner than this after its last one that published something ended: under load
    # each publishes what committed meanwhile (fewer, fuller produce requests), while the first commit after a
    # quiet spell goes at once. Under load an event waits up to this long more before it reaches Kafka (README,
    # "Production configuration").
    relay_linger_seconds: float = Field(default=0.1, ge=0)
