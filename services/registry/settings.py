from __future__ import annotations

import base64

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.grants import DEV_PRIVATE_KEY
from shared.settings import PublisherSettings, sqlite_url

# Public development keys (32 bytes each, base64). Refused in production.
DEV_MY_NUMBER_KEY = base64.b64encode(b"vrs-dev-my-number-aes-key-32byte").decode()
DEV_MY_NUMBER_HASH_KEY = base64.b64encode(b"vrs-dev-my-number-hmac-key-32byt").decode()


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
    # Resident CSV imports: rows per transaction, and whether this replica resumes unfinished imports at start.
    # ES256 private key (PEM) signing transfer-lookup grants; records holds the public half.
    transfer_grant_private_key: str = DEV_PRIVATE_KEY
    import_batch_size: int = Field(default=1000, ge=1, le=5000)
    run_imports: bool = True

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
            DEV_MY_NUMBER_KEY in self.my_number_keys.values() or self.my_number_hash_key == DEV_MY_NUMBER_HASH_KEY
        ):
            raise ValueError("development My Number keys are refused in production")
        if self.environment == "production" and self.transfer_grant_private_key == DEV_PRIVATE_KEY:
            raise ValueError("the development transfer-grant key is refused in production")
        if not self.shard_dsns:
            raise ValueError("VRS_REGISTRY_SHARD_DSNS needs at least one shard")
        return self
