"""The dashboard in a real browser (Debian's chromium driven by Playwright) against the running system:
it shows the numbers the API returns, in Japanese conventions, and moves when a dose arrives, without a
reload. A screenshot of each run is kept under ``var/artifacts/``."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.launcher import Stack
from devtools.tokens import bearer_headers
from shared.auth import Role
from tests.factories import unavailable

playwright_api: Any  # None when playwright is missing: a skip locally, a failure on CI (the dev extras have it)
try:
    import playwright.async_api as playwright_api
except ImportError:
    playwright_api = None

CHROMIUM = os.environ.get("VRS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--lang=ja-JP",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "artifacts"
CLINIC = bearer_headers(Role.INSTITUTION, institution="1312345678")
CHIYODA, SAPPORO = "131016", "011002"


def coupon(municipality: str, dose_number: int) -> str:
    return f"1{dose_number}{municipality}{uuid.uuid4().int % 10**10:010d}"


async def record(gw: httpx.AsyncClient, municipality: str, *, dose_number: int = 1, on: str = "2021-06-01") -> None:
    body = {
        "coupon": coupon(municipality, dose_number),
        "dose_number": dose_number,
        "vaccinated_on": on,
        "vaccine": "pfizer",
        "lot_number": "EY0583",
        "venue": "会場",
    }
    r = await gw.post("/api/v1/doses", json=body, headers={**CLINIC, "Idempotency-Key": str(uuid.uuid4())})
    assert r.status_code == 201, r.text


def ja(n: int) -> str:
    return f"{n:,}"  # ja-JP groups by thousands with commas, as en-US does


def pct(rate: float) -> str:
    return f"{rate * 100:,.2f}%"


def shown(rows: list[dict[str, Any]], band: str, *, dose_number: int) -> str:
    """What the dashboard's 10-year table shows for a band's dose: the visible sum, ＊ when something is hidden."""
    counts = [r["count"] for r in rows if r["age_band_10"] == band and r["dose_number"] == dose_number]
    visible = sum(c for c in counts if c is not None)
    if None not in counts:
        return ja(visible)
    return f"{ja(visible)}＊" if visible else "＊"


async def api_total(gw: httpx.AsyncClient) -> int:
    rows = (await gw.get("/api/v1/stats/doses", params={"group_by": "dose_number"})).json()["rows"]
    return sum(int(r["count"]) for r in rows)


async def wait_total(gw: httpx.AsyncClient, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (total := await api_total(gw)) < at_least:
        assert time.monotonic() < deadline, f"stats stayed at {total} doses, expected {at_least}"
        await asyncio.sleep(0.1)
    return total


@pytest.fixture
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url(), timeout=30) as client:
        yield client


def require_chromium() -> None:
    if playwright_api is None:
        unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} not found (apt-get install chromium fonts-noto-cjk)")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    require_chromium()
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def test_dashboard_shows_the_apis_numbers_and_follows_new_doses(
    gw: httpx.AsyncClient, stack: Stack, browser: Any, request: pytest.FixtureRequest
) -> None:
    before = await api_total(gw)
    for municipality, dose_number, on in [
        (CHIYODA, 1, "2021-06-01"),
        (CHIYODA, 1, "2021-06-02"),
        (SAPPORO, 1, "2021-06-02"),
        (CHIYODA, 2, "2021-06-23"),
    ]:
        await record(gw, municipality, dose_number=dose_number, on=on)
    total = await wait_total(gw, before + 4)
    national = (await gw.get("/api/v1/stats/coverage")).json()["rows"]
    hokkaido = (await gw.get("/api/v1/stats/coverage", params={"prefecture": "01"})).json()["rows"][0]

    page = await browser.new_page(viewport={"width": 1280, "height": 1800}, locale="ja-JP", timezone_id="Asia/Tokyo")
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    response = await page.goto(stack.url() + "/dashboard")
    assert response is not None and response.status == 200
    # Locators and expect() rather than wait_for_function: the page's CSP (rightly) forbids eval.
    await page.wait_for_selector('body[data-as-of]:not([data-as-of=""])')

    assert await page.text_content("#total-all") == ja(total)
    one, two = national[0], national[1]
    assert await page.text_content("#rate-1") == pct(one["rate"])
    assert (await page.text_content("#people-1") or "").startswith(
        f"{ja(one['count'])} 人 / 人口 {ja(one['population'])} 人"
    )
    assert (await page.text_content("#people-2") or "").startswith(f"{ja(two['count'])} 人")
    assert await page.text_content("#rate65-2") == pct(two["rate_65_and_over"])
    row = page.locator('#prefectures tr[data-prefecture="01"] td')
    assert await row.nth(0).text_content() == "北海道"
    assert await row.nth(1).text_content() == ja(hokkaido["count"])
    assert await row.nth(7).text_content() == ja(hokkaido["population"])
    assert "年" in (await page.text_content("#as-of") or "")  # 2026年11月25日 …（日本時間）
    # The charts are drawn by ECharts (canvas), loaded from stats itself under the strict CSP.
    # The 10-year bands as the public gets them: a count the API hides (null) shows as ＊, never as a number.
    public = (await gw.get("/api/v1/stats/doses", params={"group_by": "age_band_10,dose_number"})).json()["rows"]
    for band, label in (("UNK", "不明"), ("70-79", "70代")):
        cells = page.locator(f'#ages10 tr[data-band="{band}"] td')
        assert await cells.nth(0).text_content() == label
        assert await cells.nth(1).text_content() == shown(public, band, dose_number=1)
    for chart in ("daily", "cumulative", "age-sex", "age10", "tiles"):
        assert await page.locator(f"#{chart} canvas").count() >= 1, chart
    assert problems == [], problems

    # A new dose: the page follows without a reload.
    await record(gw, SAPPORO, on="2021-06-30")
    after = await wait_total(gw, total + 1)
    await playwright_api.expect(page.locator("#total-all")).to_have_text(ja(after), timeout=30_000)
    assert await page.text_content("#latest-label") == "最新の接種日（2021年6月30日）"

    # Dates are chosen and shown as 年・月・日 in any browser (Debian's headless chromium draws a date input as
    # mm/dd/yyyy whatever --lang says). Only days that exist can be chosen: a 31st chosen in January falls back
    # to 日 when the month becomes February (28 days in 2021), and an incomplete date is refused, not ignored.
    await page.select_option("#to-year", "2021")
    await page.select_option("#to-month", "01")
    await page.select_option("#to-day", "31")
    await page.select_option("#to-month", "02")
    assert await page.locator("#to-day option").count() == 1 + 28
    assert await page.locator("#to-day option:checked").text_content() == "--日"
    await page.click('#filters button[type="submit"]')
    await playwright_api.expect(page.locator("#status")).to_have_text(
        "接種日（まで）は年・月・日をすべて選んでください。"
    )
    # A period: the page shows it in Japanese and its totals equal the API's for it.
    for name, (year, month, day) in (("from", ("2021", "06", "02")), ("to", ("2021", "06", "23"))):
        await page.select_option(f"#{name}-year", year)
        await page.select_option(f"#{name}-month", month)
        await page.select_option(f"#{name}-day", day)
    chosen = [await page.locator(f"#from-{unit} option:checked").text_content() for unit in ("year", "month", "day")]
    assert chosen == ["2021年", "6月", "2日"]
    await page.click('#filters button[type="submit"]')
    period = {"group_by": "dose_number", "from": "2021-06-02", "to": "2021-06-23"}
    in_period = sum(int(r["count"]) for r in (await gw.get("/api/v1/stats/doses", params=period)).json()["rows"])
    await playwright_api.expect(page.locator("#scope-label")).to_have_text("（全国・2021年6月2日〜2021年6月23日）")
    await playwright_api.expect(page.locator("#total-all")).to_have_text(ja(in_period))
    assert in_period < after  # the period left doses out: the filter reached the API
    await playwright_api.expect(page.locator("#status")).to_have_text("")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{request.node.callspec.id}.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    assert problems == [], problems
