from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.dev_keys import (
    DEV_AUDIT_KEY,
    DEV_GATEWAY_KID,
    DEV_GATEWAY_PRIVATE_PEM,
    is_development_key,
    is_development_private_pem,
)
from shared.settings import ServiceSettings, sqlite_url, var_dir

# HMAC keys shorter than this are refused in production (RFC 2104: at least the hash's output length).
MIN_AUDIT_KEY_LENGTH = 32


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_GATEWAY_", extra="ignore")

    # Holds the audit log only.
    main_dsn: str = Field(default_factory=lambda: sqlite_url("gateway/main.db"))
    pool_size: int = Field(default=5, ge=1)

    registry_url: str = "http://127.0.0.1:8001"
    records_url: str = "http://127.0.0.1:8002"
    stats_url: str = "http://127.0.0.1:8003"

    # --- callers' identity tokens (ES256/RS256 with kid, from the identity provider's JWKS) ---
    # Exactly one of the two in production; neither in development means the committed development JWKS.
    identity_jwks_file: Path | None = None
    identity_jwks_url: str | None = None
    identity_issuer: str = "vrs-dev"
    identity_audience: str = "vrs-api"
    token_max_lifetime_seconds: int = Field(default=3600, ge=60, le=24 * 3600)
    clock_skew_seconds: int = Field(default=30, ge=0, le=120)
    jwks_refresh_seconds: float = Field(default=300.0, gt=0)
    # After this long without a successful refresh the keys are no longer trusted (fail closed).
    jwks_max_stale_seconds: float = Field(default=3600.0, gt=0)
    token_cache_size: int = Field(default=10_000, ge=0)
    token_cache_seconds: float = Field(default=300.0, gt=0)

    # --- internal tokens: the gateway's own ES256 key (a secret); its public half is VRS_AUTH_GATEWAY_JWKS ---
    signing_key: str = DEV_GATEWAY_PRIVATE_PEM
    signing_kid: str = DEV_GATEWAY_KID
    internal_token_seconds: int = Field(default=120, ge=10)

    # --- the audit trail ---
    # HMAC key of the audit entries: a gateway secret the database administrator does not hold.
    audit_key: str = DEV_AUDIT_KEY
    # One chain per gateway process: the host (the pod's name in Kubernetes) and the process id, so that
    # replicas and uvicorn workers never share a chain. A restart starts a new chain; old ones stay verifiable.
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()[:50]}-{os.getpid()}", pattern=r"^[A-Za-z0-9._-]{1,61}$"
    )
    # Chains written side by side by this process (<instance_id>, <instance_id>.1, ...). Intents go to whichever
    # chain's writer is free first: with one chain a request that arrives while a batch commits waits for that
    # commit and goes in the next batch with whatever queued meanwhile; with two it is taken by the other writer at
    # once, and under load the two commit in turn, each batch about half as large (more commits, more of
    # PostgreSQL's CPU an entry). One is the default: with records behind the gateway, its fewer commits left
    # PostgreSQL's CPU to the doses (docs/performance.md, "one audit chain by default"). Two or more carry more
    # audited requests a second when the upstream is cheap and the trail's commits are the limit.
    audit_chains: int = Field(default=1, ge=1, le=99)
    # Where each chain's head is anchored after every batch: outside the database (see audit.py).
    audit_anchor_dir: Path = Field(default_factory=lambda: var_dir() / "gateway" / "audit-anchors")
    audit_batch_max: int = Field(default=1000, ge=1)
    # How long outcome entries (nobody waits for them) wait for the next request's intent to share its commit.
    audit_linger_seconds: float = Field(default=0.002, ge=0, le=1)
    # How long a request waits for its intent entry before it is refused (503) without being forwarded.
    audit_timeout_seconds: float = Field(default=5.0, gt=0)
    # Entries are kept this many years — seven at least, as long as registry's transfer disclosure log, whose rows
    # name the audit entry of their request — and then cut from the front of their chain. Every replica looks every
    # audit_purge_seconds (0: never); one cuts at a time (services/gateway/housekeeping.py).
    audit_keep_years: int = Field(default=7, ge=7)
    audit_purge_seconds: float = Field(default=3600, ge=0)

    # --- limits ---
    # Token buckets: per principal (authenticated) and per client address (anonymous).
    rate_per_principal: float = Field(default=2000.0, gt=0)
    burst_per_principal: float = Field(default=4000.0, gt=0)
    rate_per_address: float = Field(default=50.0, gt=0)
    burst_per_address: float = Field(default=100.0, gt=0)
    # JSON bodies are small; CSV imports (resident-imports, dose-imports) get the large limit.
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1)
    max_import_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # JSON nested deeper than this is refused before it reaches a service.
    max_json_depth: int = Field(default=32, ge=2)

    # raw: the gateway's own HTTP/1.1 client (services/gateway/proxy.py); aiohttp and httpx for comparison.
    proxy_transport: Literal["raw", "aiohttp", "httpx"] = "raw"
    proxy_pool_size: int = Field(default=100, ge=1)
    proxy_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    proxy_timeout_seconds: float = Field(default=30.0, gt=0)
    # Below uvicorn's 5 s idle timeout, so the gateway never reuses a socket the upstream is closing.
    proxy_keepalive_seconds: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _production_refuses_development_keys(self) -> GatewaySettings:
        if self.internal_token_seconds > self.auth.internal_token_max_seconds:
            raise ValueError("VRS_GATEWAY_INTERNAL_TOKEN_SECONDS exceeds what the services accept")
        if self.environment != "production":
            return self
        problems = []
        if is_development_private_pem(self.signing_key):
            problems.append("VRS_GATEWAY_SIGNING_KEY is the development key")
        if is_development_key(self.audit_key, DEV_AUDIT_KEY):
            problems.append("VRS_GATEWAY_AUDIT_KEY is the development key")
        elif len(self.audit_key) < MIN_AUDIT_KEY_LENGTH:
            problems.append(f"VRS_GATEWAY_AUDIT_KEY is shorter than {MIN_AUDIT_KEY_LENGTH} characters")
        if (self.identity_jwks_file is None) == (self.identity_jwks_url is None):
            problems.append("set exactly one of VRS_GATEWAY_IDENTITY_JWKS_FILE and VRS_GATEWAY_IDENTITY_JWKS_URL")
        if self.identity_jwks_url is not None and not self.identity_jwks_url.startswith("https://"):
            problems.append("VRS_GATEWAY_IDENTITY_JWKS_URL must be https")
        if problems:
            raise ValueError("; ".join(problems) + " (refused with VRS_ENVIRONMENT=production)")
        return self
