"""gateway — authenticates, authorises, limits and forwards; owns nothing but the audit trail."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from services.gateway.audit import AuditChains, AuditTrail, FileAnchorStore
from services.gateway.housekeeping import purge_pass
from services.gateway.limits import RateLimiter
from services.gateway.openapi import build_openapi
from services.gateway.policy import TABLE, Upstream
from services.gateway.proxy import create_transport
from services.gateway.router import FastPath, audit_reader, router
from services.gateway.service import Gateway, Limits
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import IdentityVerifier, InternalTokenIssuer, JwksSource
from shared.app import build_app
from shared.auth import Keyset, TokenRules
from shared.db import Databases
from shared.dev_keys import DEV_IDENTITY_JWK, jwks_of
from shared.periodic import cancel_and_wait, every_in_background


def identity_source(settings: GatewaySettings, verifiers: list[IdentityVerifier]) -> JwksSource:
    def keys_removed(kids: frozenset[str]) -> None:
        for verifier in verifiers:
            verifier.keys_removed(kids)

    production = settings.environment == "production"
    return JwksSource(
        file=settings.identity_jwks_file,
        url=settings.identity_jwks_url,
        # Development and test without a configured JWKS trust the committed development key (vrs token).
        default=None if production else jwks_of(DEV_IDENTITY_JWK),
        refuse_development_keys=production,
        refresh_seconds=settings.jwks_refresh_seconds,
        max_stale_seconds=settings.jwks_max_stale_seconds,
        on_keys_removed=keys_removed,
    )


def internal_issuer(settings: GatewaySettings) -> InternalTokenIssuer:
    issuer = InternalTokenIssuer(
        private_pem=settings.signing_key,
        kid=settings.signing_kid,
        issuer=settings.auth.internal_issuer,
        audience=settings.auth.internal_audience,
        ttl_seconds=settings.internal_token_seconds,
    )
    # A key the services do not know would make every forwarded request a 401: refuse to start instead.
    published = Keyset.from_jwks(settings.auth.gateway_jwks).get(settings.signing_kid)
    if published is None or {k: published.jwk.get(k) for k in ("x", "y")} != {
        k: issuer.public_jwk[k] for k in ("x", "y")
    }:
        raise ValueError("VRS_GATEWAY_SIGNING_KEY's public key is not in VRS_AUTH_GATEWAY_JWKS under its kid")
    return issuer


class GatewayApp(FastAPI):
    """The app ``build_app`` made, entered through :class:`~services.gateway.router.FastPath` first."""

    fast_path: FastPath

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path.serves(scope):
            scope["app"] = self
            await self.fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    issuer = internal_issuer(settings)  # checked before anything starts

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verifiers: list[IdentityVerifier] = []
        app.state.identity_keys = source = identity_source(settings, verifiers)
        await source.start()  # no usable identity keys → the gateway does not start
        verifier = IdentityVerifier(
            source,
            TokenRules(
                issuer=settings.identity_issuer,
                audience=settings.identity_audience,
                max_lifetime_seconds=settings.token_max_lifetime_seconds,
                leeway_seconds=settings.clock_skew_seconds,
            ),
            cache_size=settings.token_cache_size,
            cache_seconds=settings.token_cache_seconds,
        )
        verifiers.append(verifier)
        app.state.identity_verifier = verifier
        app.state.databases = Databases.connect(settings.main_dsn, pool_size=settings.pool_size)
        app.state.transport = create_transport(settings)
        anchors = FileAnchorStore(settings.audit_anchor_dir)
        app.state.audit = AuditChains(
            [
                AuditTrail(
                    app.state.databases,
                    key=settings.audit_key.encode(),
                    instance=name,
                    anchors=anchors,
                    batch_max=settings.audit_batch_max,
                    timeout=settings.audit_timeout_seconds,
                    linger=settings.audit_linger_seconds,
                )
                for name in AuditChains.names(settings.instance_id, settings.audit_chains)
            ]
        )
        purge = None
        try:
            await app.state.audit.start()
            if settings.audit_purge_seconds > 0:
                purge = every_in_background(
                    settings.audit_purge_seconds,
                    functools.partial(
                        purge_pass,
                        app.state.databases,
                        settings.audit_key.encode(),
                        keep_years=settings.audit_keep_years,
                    ),
                    name="audit trail purge",
                )
            app.state.gateway = Gateway(
                upstreams={
                    Upstream.REGISTRY: settings.registry_url,
                    Upstream.RECORDS: settings.records_url,
                    Upstream.STATS: settings.stats_url,
                },
                transport=app.state.transport,
                tokens=verifier,
                internal_tokens=issuer,
                audit=app.state.audit,
                limits=Limits(
                    json_body_bytes=settings.max_json_body_bytes,
                    import_body_bytes=settings.max_import_body_bytes,
                    json_depth=settings.max_json_depth,
                    per_principal=RateLimiter(rate=settings.rate_per_principal, burst=settings.burst_per_principal),
                    per_address=RateLimiter(rate=settings.rate_per_address, burst=settings.burst_per_address),
                ),
                local={
                    "/api/v1/municipalities/{code}/audit": audit_reader(app.state.databases, settings.audit_keep_years)
                },
            )
            yield
        finally:
            await cancel_and_wait(purge)
            await app.state.audit.stop()
            await source.stop()
            await app.state.transport.close()
            await app.state.databases.dispose()

    async def ready(app: FastAPI) -> None:
        await app.state.databases.ping()
        await app.state.gateway.check_upstreams(timeout=settings.proxy_connect_timeout_seconds + 1)

    # The gateway's app first: the process's log lines carry the first service configured in it, and
    # building the services' apps for their OpenAPI comes after.
    app = build_app(
        service="gateway", settings=settings, lifespan=lifespan, routers=[router], ready=ready, behind_gateway=False
    )
    contract = build_openapi(TABLE)
    app.openapi = lambda: contract  # type: ignore[method-assign]
    # Everything but the gateway's own paths (health, metrics, docs, JWKS) skips FastAPI altogether.
    routes = [*app.routes, *router.routes]  # the included router's routes are not listed in app.routes
    own_paths = frozenset(path for route in routes if "{" not in (path := str(getattr(route, "path", "{}"))))
    app.__class__ = GatewayApp
    cast(GatewayApp, app).fast_path = FastPath(own_paths=own_paths)
    return app
