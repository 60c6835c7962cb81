from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.registry.shc import IssuerKey
from shared.dev_keys import is_development_key
from shared.grants import DEV_PRIVATE_KEY
from shared.settings import PublisherSettings, sqlite_url

# Public development keys (32 bytes each, base64). Refused in production.
DEV_MY_NUMBER_KEY = base64.b64encode(b"vrs-dev-my-number-aes-key-32byte").decode()
DEV_MY_NUMBER_HASH_KEY = base64.b64encode(b"vrs-dev-my-number-hmac-key-32byt").decode()
# The development SMART Health Card issuer key (ES256) and rid secret: public, so refused in production.
DEV_SHC_PRIVATE_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQ31Nnn3i36K2ciZV
BBAFrItXRXZi663LnRDwt+TcTXWhRANCAASY+PObDc6Z7qJJbm9XqYD/TDvkZ4O4
8wvU8YeHu/UMZqHPt3T1NuZ85iqQ/CP0et7x2gL7/wsCU69E7vYsytXQ
-----END PRIVATE KEY-----
"""
DEV_SHC_RID_SECRET = base64.b64encode(b"vrs-dev-shc-revocation-id-secret").decode()
# The path the gateway routes to registry's issuer documents (jwks.json, crl/): the issuer URL ends with it.
SHC_ISSUER_PATH = "/issuer"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class RegistrySettings(PublisherSettings):
    model_config = SettingsConfigDict(env_prefix="VRS_REGISTRY_", extra="ignore")

    # The main database holds the shard map and the global My Number directory.
    main_dsn: str = Field(default_factory=lambda: sqlite_url("registry/main.db"))
    shard_dsns: dict[str, str] = Field(
        default_factory=lambda: {name: sqlite_url(f"registry/shard-{name}.db") for name in ("s0", "s1")}
    )
    pool_size: int = 20
    # Only for reads on behalf of a caller (a resident with their doses); registry never tells records anything.
    records_url: str = "http://127.0.0.1:8002"
    # AES-256-GCM keys by key id; new My Numbers are sealed with the active one, old ids still open.
    my_number_keys: dict[str, str] = Field(default_factory=lambda: {"dev1": DEV_MY_NUMBER_KEY})
    my_number_active_key: str = "dev1"
    # HMAC-SHA256 key of the directory's keyed hash (rotating it means rebuilding the directory).
    my_number_hash_key: str = DEV_MY_NUMBER_HASH_KEY
    # SMART Health Cards: ``iss`` of every card (the gateway's public URL + /issuer; https in production), the
    # ES256 signing key (PEM or a private JWK), the HMAC secret that derives revocation ids (base64, 32 bytes).
    shc_issuer: str = "http://127.0.0.1:8000" + SHC_ISSUER_PATH
    shc_private_key: str = Field(default=DEV_SHC_PRIVATE_KEY, repr=False)
    shc_rid_secret: str = Field(default=DEV_SHC_RID_SECRET, repr=False)
    # Public keys of signing keys no longer in use (JSON list of JWKs or PEMs): cards they signed stay
    # verifiable, listed in jwks.json with their revocation lists, as the spec asks during a rollover.
    shc_retired_public_keys: list[str] = Field(default_factory=list)
    # The paper certificate's font (embedded) and the municipality master its issuer's name comes from
    # (the team's data folder, read in place; without it the code is printed).
    certificate_font: Path = Path("/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf")
    municipalities_csv: Path | None = (
        _PROJECT_ROOT.parent / "shared" / "data" / "municipalities" / "localgovjp-utf8.csv"
    )
    # ES256 private key (PEM) signing registry's grants — transfer lookups and certificate checks (see
    # shared/grants.py); records holds the public half.
    transfer_grant_private_key: str = DEV_PRIVATE_KEY
    # Resident CSV imports: rows per transaction, and whether this replica resumes unfinished imports at start.
    import_batch_size: int = Field(default=5000, ge=1, le=20000)
    # Processes that check, seal and hash an import's rows on PostgreSQL (0: in the API process itself), for
    # files of at least import_workers_min_bytes (starting them costs about a second).
    import_workers: int = Field(default=2, ge=0, le=32)
    import_workers_min_bytes: int = Field(default=1 << 20, ge=0)
    run_imports: bool = True
    # The certificate revocation sweep in the API process: seconds between passes (0: no sweep here), and
    # certificates per records call. Replicas take turns (an advisory lock), so every replica may run it.
    certificate_sweep_seconds: float = Field(default=30.0, ge=0)
    certificate_sweep_batch: int = Field(default=500, ge=1, le=1000)
    # 情報提供等記録 (the transfer disclosure log) are kept this many years — seven at least, as the My Number Act's
    # order requires of them — and then deleted (personal data no longer needed goes). Every replica looks every
    # disclosure_purge_seconds (0: never); one deletes at a time (services/registry/housekeeping.py).
    disclosure_keep_years: int = Field(default=7, ge=7)
    disclosure_purge_seconds: float = Field(default=3600, ge=0)

    @model_validator(mode="after")
    def _check_keys(self) -> RegistrySettings:
        if self.my_number_active_key not in self.my_number_keys:
            raise ValueError("VRS_REGISTRY_MY_NUMBER_ACTIVE_KEY names no key in VRS_REGISTRY_MY_NUMBER_KEYS")
        for kid, key in self.my_number_keys.items():
            if len(base64.b64decode(key)) != 32:
                raise ValueError(f"My Number key {kid!r} must be 32 bytes, base64-encoded")
        hash_key = base64.b64decode(self.my_number_hash_key)
        if len(hash_key) < 32:
            raise ValueError("VRS_REGISTRY_MY_NUMBER_HASH_KEY must be at least 32 bytes, base64-encoded")
        if any(base64.b64decode(key) == hash_key for key in self.my_number_keys.values()):
            # One secret for two jobs: whoever holds the encryption key could also rebuild the directory.
            raise ValueError("the My Number HMAC key must differ from every encryption key")
        if self.environment == "production" and (
            any(is_development_key(key, DEV_MY_NUMBER_KEY) for key in self.my_number_keys.values())
            or is_development_key(self.my_number_hash_key, DEV_MY_NUMBER_HASH_KEY)
        ):
            raise ValueError("development My Number keys are refused in production")
        self._check_shc()
        if self.environment == "production" and is_development_key(self.transfer_grant_private_key, DEV_PRIVATE_KEY):
            raise ValueError("the development transfer-grant key is refused in production")
        if not self.shard_dsns:
            raise ValueError("VRS_REGISTRY_SHARD_DSNS needs at least one shard")
        return self

    def _check_shc(self) -> None:
        issuer = urlsplit(self.shc_issuer)
        if not issuer.scheme or not issuer.netloc or issuer.path != SHC_ISSUER_PATH:
            raise ValueError(f"VRS_REGISTRY_SHC_ISSUER must be an absolute URL whose path is {SHC_ISSUER_PATH}")
        try:
            key = IssuerKey.load(self.shc_private_key)
        except ValueError as exc:
            raise ValueError(f"VRS_REGISTRY_SHC_PRIVATE_KEY: {exc}") from None
        for i, retired in enumerate(self.shc_retired_public_keys):
            try:
                IssuerKey.load_public(retired)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"VRS_REGISTRY_SHC_RETIRED_PUBLIC_KEYS[{i}]: {exc}") from None
        if len(base64.b64decode(self.shc_rid_secret)) != 32:
            raise ValueError("VRS_REGISTRY_SHC_RID_SECRET must be 32 bytes, base64-encoded")
        if self.environment == "production":
            # Compared by thumbprint: the same public key given as a JWK is still the development key.
            if key.kid == IssuerKey.load(DEV_SHC_PRIVATE_KEY).kid or is_development_key(
                self.shc_rid_secret, DEV_SHC_RID_SECRET
            ):
                raise ValueError("the development SMART Health Card key and rid secret are refused in production")
            if issuer.scheme != "https":
                raise ValueError("VRS_REGISTRY_SHC_ISSUER must be https in production (verifiers fetch its keys)")
