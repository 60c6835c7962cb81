from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, sqlite_url


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_GATEWAY_", extra="ignore")

    # Holds the audit log only.
    main_dsn: str = Field(default_factory=lambda: sqlite_url("gateway/main.db"))
    # Audit appends are serialised, so a few connections are plenty.
    pool_size: int = Field(default=5, ge=1)

    registry_url: str = "http://127.0.0.1:8001"
    records_url: str = "http://127.0.0.1:8002"
    stats_url: str = "http://127.0.0.1:8003"

    # aiohttp carries five to six times httpx's rate as the proxy's client (services/gateway/bench.py).
    proxy_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # Kept-alive connections per upstream.
    proxy_pool_size: int = Field(default=100, ge=1)
    # Connecting takes longer than this → the upstream is unreachable (503).
    proxy_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    # The whole exchange takes longer than this → 504.
    proxy_timeout_seconds: float = Field(default=30.0, gt=0)
    # Below uvicorn's 5 s idle timeout, so the gateway never reuses a socket the upstream is closing.
    proxy_keepalive_seconds: float = Field(default=4.0, gt=0)
    # Bodies are buffered, not streamed: dose batches (≤ 1,000 items) and resident CSV imports.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
