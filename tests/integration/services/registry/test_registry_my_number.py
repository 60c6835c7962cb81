"""My Number at rest: sealed, found by keyed hash, never stored or returned in plain text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from services.registry.app import create_app
from services.registry.models import MyNumberDirectoryEntry, Resident
from services.registry.settings import RegistrySettings
from shared.auth import Role
from shared.migrations import upgrade
from tests.factories import InternalHeaders, internal_headers

TREES = Path(__file__).resolve().parents[4] / "services" / "registry" / "migrations"
MY_NUMBER = "123456789018"
CHIYODA = "131016"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, Path]]:
    settings = RegistrySettings(
        main_dsn=f"sqlite+aiosqlite:///{tmp_path / 'main.db'}",
        shard_dsns={s: f"sqlite+aiosqlite:///{tmp_path / f'{s}.db'}" for s in ("s0", "s1")},
        records_url="http://127.0.0.1:9",  # unreachable on purpose: the holder notice is best effort
    )
    await asyncio.to_thread(upgrade, settings.main_dsn, TREES / "main")
    for dsn in settings.shard_dsns.values():
        await asyncio.to_thread(upgrade, dsn, TREES / "shard")
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://registry") as client,
    ):
        yield app, client, tmp_path


def municipality(code: str = CHIYODA) -> InternalHeaders:
    return internal_headers(Role.MUNICIPALITY, municipality=code)


async def test_my_number_is_sealed_masked_and_in_the_directory(
    registry: tuple[FastAPI, httpx.AsyncClient, Path],
) -> None:
    app, client, folder = registry
    body = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "sex": "F", "my_number": MY_NUMBER}
    r = await client.put(f"/api/v1/municipalities/{CHIYODA}/residents/A1", json=body, headers=municipality())
    assert r.status_code == 201
    assert r.json()["my_number"] == "********9018" and MY_NUMBER not in r.text

    # Nowhere on disk in plain text: not in the shards, not in the directory.
    await app.state.databases.dispose()
    for db_file in folder.glob("*.db*"):
        assert MY_NUMBER.encode() not in db_file.read_bytes(), db_file.name

    vault, dbs = app.state.vault, app.state.databases
    shard = await dbs.shard_of(CHIYODA)
    async with dbs.shards[shard].sessionmaker() as session:
        resident = (await session.execute(select(Resident))).scalar_one()
    assert resident.my_number_ciphertext is not None and resident.my_number_key_id is not None
    assert vault.open(resident.my_number_key_id, resident.my_number_ciphertext, context=f"{CHIYODA}/A1") == MY_NUMBER
    with pytest.raises(Exception):  # noqa: B017 - the ciphertext is bound to its resident
        vault.open(resident.my_number_key_id, resident.my_number_ciphertext, context=f"{CHIYODA}/A2")
    async with dbs.main.sessionmaker() as session:
        entry = (await session.execute(select(MyNumberDirectoryEntry))).scalar_one()
    assert (entry.my_number_hash, entry.municipality_code, entry.resident_id) == (
        vault.keyed_hash(MY_NUMBER),
        CHIYODA,
        "A1",
    )


async def test_removing_the_number_removes_the_directory_entry(
    registry: tuple[FastAPI, httpx.AsyncClient, Path],
) -> None:
    app, client, _ = registry
    path = f"/api/v1/municipalities/{CHIYODA}/residents/A1"
    body = {"name": "山田 花子", "name_kana": "ヤマダ ハナコ", "sex": "F", "my_number": MY_NUMBER}
    assert (await client.put(path, json=body, headers=municipality())).status_code == 201
    del body["my_number"]
    r = await client.put(path, json=body, headers=municipality())
    assert r.status_code == 200 and r.json()["my_number"] is None
    async with app.state.databases.main.sessionmaker() as session:
        assert (await session.execute(select(MyNumberDirectoryEntry))).first() is None


async def test_a_coupon_is_held_by_one_resident(registry: tuple[FastAPI, httpx.AsyncClient, Path]) -> None:
    _, client, _ = registry
    body = {"name": "a", "name_kana": "ア", "sex": "M", "coupon_number": "0000000042"}
    assert (
        await client.put(f"/api/v1/municipalities/{CHIYODA}/residents/A1", json=body, headers=municipality())
    ).status_code == 201
    r = await client.put(f"/api/v1/municipalities/{CHIYODA}/residents/A2", json=body, headers=municipality())
    assert r.status_code == 409 and r.json()["error"] == "Conflict"


async def test_municipalities_are_kept_apart(registry: tuple[FastAPI, httpx.AsyncClient, Path]) -> None:
    _, client, _ = registry
    body = {"name": "a", "name_kana": "ア", "sex": "M"}
    path = f"/api/v1/municipalities/{CHIYODA}/residents/A1"
    assert (await client.put(path, json=body, headers=municipality())).status_code == 201
    assert (await client.put(path, json=body, headers=municipality("011002"))).status_code == 403
    foreign = await client.get(path, headers=municipality("011002"))
    unknown = await client.get(f"/api/v1/municipalities/{CHIYODA}/residents/nobody", headers=municipality())
    assert foreign.status_code == unknown.status_code == 404 and foreign.content == unknown.content
