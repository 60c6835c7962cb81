"""Key rotation re-seals every My Number under the active key, batch by batch, while old ids still open."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from jwcrypto import jwk
from sqlalchemy import text

from services.registry.crypto import MyNumberVault
from services.registry.importer import reseal_chunks_batch
from services.registry.repository import ImportRepository
from services.registry.service import rotate_keys_batch
from services.registry.settings import DEV_MY_NUMBER_HASH_KEY, DEV_MY_NUMBER_KEY, RegistrySettings
from shared.dev_keys import jwks_of
from tests.integration.services.registry.registry_support import CHIYODA, SAPPORO, migrated_registry, serve
from tests.integration.services.registry.test_registry_imports import csv_of, my_number, stored_upload
from tests.unit.services.gateway.test_gateway_tokens import ec_key

NEW_KEY = base64.b64encode(b"k2-rotation-test-key-32-bytes!!!").decode()


async def test_rotation_reseals_in_batches_and_resumes(make_database: Callable[..., str]) -> None:
    settings = await migrated_registry(make_database)
    rows = [f"R{i},名前,ナマエ,,1,{my_number(500 + i)},," for i in range(7)]
    async for registry in serve(settings):
        await registry.import_csv(csv_of(*rows))
        await registry.import_csv(csv_of(f"S1,名前,ナマエ,,1,{my_number(600)},,"), code=SAPPORO)

    rotated = settings.model_copy(update={"my_number_keys": {"dev1": DEV_MY_NUMBER_KEY, "k2": NEW_KEY}})
    rotated = rotated.model_copy(update={"my_number_active_key": "k2"})
    vault = MyNumberVault(rotated)
    async for registry in serve(rotated):
        s0 = registry.databases.shards["s0"]
        # One batch of 3, then the "process" stops: the rest is still under dev1 and still opens.
        async with s0.sessionmaker() as session, session.begin():
            assert await rotate_keys_batch(session, vault, limit=3) == 3
        residents = await registry.residents()
        assert sorted(str(r.my_number_key_id) for r in residents) == ["dev1"] * 4 + ["k2"] * 3
        for r in residents:
            opened = vault.open(
                str(r.my_number_key_id), bytes(r.my_number_ciphertext or b""), context=f"{CHIYODA}/{r.resident_id}"
            )
            assert opened == my_number(500 + int(r.resident_id[1:]))
        hashes = {r.resident_id: r.my_number_hash for r in residents}
        # Resumed: every shard to the end.
        for db in registry.databases.shards.values():
            while True:
                async with db.sessionmaker() as session, session.begin():
                    if not await rotate_keys_batch(session, vault, limit=3):
                        break
        after = await registry.residents() + await registry.residents(SAPPORO)
        assert {r.my_number_key_id for r in after} == {"k2"}
        assert {r.resident_id: r.my_number_hash for r in after if r.municipality_code == CHIYODA} == hashes
        only_new = MyNumberVault(rotated.model_copy(update={"my_number_keys": {"k2": NEW_KEY}}))
        for r in after:
            only_new.open("k2", bytes(r.my_number_ciphertext or b""), context=f"{r.municipality_code}/{r.resident_id}")


async def test_rotation_reseals_stored_uploads_so_the_old_key_can_go(make_database: Callable[..., str]) -> None:
    # Three imports not yet run: one stored before uploads were sealed, one under dev1, one under the new key.
    settings = await migrated_registry(make_database, run_imports=False)
    files = [csv_of(f"U{n},名前,ナマエ,,1,{my_number(700 + n)},,") for n in range(3)]
    async for registry in serve(settings):
        legacy = await stored_upload(registry, files[0])
        async with registry.databases.main.sessionmaker() as session, session.begin():
            await session.execute(
                text("UPDATE resident_import_chunks SET key_id = NULL, data = :d WHERE import_id = :i"),
                {"d": files[0], "i": legacy},
            )
        under_dev1 = await stored_upload(registry, files[1])
    rotated = settings.model_copy(
        update={"my_number_keys": {"dev1": DEV_MY_NUMBER_KEY, "k2": NEW_KEY}, "my_number_active_key": "k2"}
    )
    vault = MyNumberVault(rotated)
    async for registry in serve(rotated):
        under_k2 = await stored_upload(registry, files[2])
        main = registry.databases.main
        async with main.sessionmaker() as session:
            assert await ImportRepository(session).chunk_key_counts() == {None: 1, "dev1": 1, "k2": 1}
        resealed = 0
        while True:
            async with main.sessionmaker() as session, session.begin():
                if not (done := await reseal_chunks_batch(session, vault, limit=1)):
                    break
                resealed += done
        assert resealed == 2
        async with main.sessionmaker() as session:
            assert await ImportRepository(session).chunk_key_counts() == {"k2": 3}

    # The old key removed, as `vrs keys status` now allows: every stored import still runs to the end.
    only_new = rotated.model_copy(update={"my_number_keys": {"k2": NEW_KEY}, "run_imports": True})
    async for registry in serve(only_new):
        for import_id in (legacy, under_dev1, under_k2):
            await registry.importer.wait(import_id)
        residents = await registry.residents()
        assert sorted(r.resident_id for r in residents) == ["U0", "U1", "U2"]
        assert {r.my_number_key_id for r in residents} == {"k2"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"my_number_keys": {"k2": DEV_MY_NUMBER_KEY}}, "development"),
        ({"my_number_hash_key": DEV_MY_NUMBER_HASH_KEY}, "development"),
        ({"my_number_hash_key": base64.b64encode(b"short").decode()}, "at least 32 bytes"),
        ({"my_number_hash_key": NEW_KEY}, "must differ"),
        ({"my_number_keys": {"k2": base64.b64encode(b"x" * 16).decode()}}, "32 bytes"),
    ],
)
def test_production_refuses_weak_or_shared_keys(
    changes: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, public = ec_key("gw-prod")
    monkeypatch.setenv("VRS_AUTH_GATEWAY_JWKS", json.dumps(jwks_of(public)))
    good: dict[str, Any] = {
        "VRS_ENVIRONMENT": "production",
        "my_number_keys": {"k2": NEW_KEY},
        "my_number_active_key": "k2",
        "my_number_hash_key": base64.b64encode(b"h" * 32).decode(),
        "transfer_grant_private_key": "-----BEGIN PRIVATE KEY-----\nnot-the-dev-key\n-----END PRIVATE KEY-----\n",
        # The card issuer's own production key and secret (the certificates' checks, not under test here).
        "shc_issuer": "https://vrs.example.jp/issuer",
        "shc_private_key": jwk.JWK.generate(kty="EC", crv="P-256")
        .export_to_pem(private_key=True, password=None)
        .decode(),
        "shc_rid_secret": base64.b64encode(b"r" * 32).decode(),
    }
    RegistrySettings(**good)  # the good configuration is accepted
    with pytest.raises(ValueError, match=message):
        RegistrySettings(**(good | changes))
