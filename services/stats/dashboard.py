"""The dashboard page and its one script library, Apache ECharts, both served by stats itself.

The page's only inline script and style are allowed by their SHA-256 hashes and every other script must
come from its own origin (``/dashboard/echarts.min.js``), so nothing else — an injected script, a CDN, a
remote font — can run or load, and its only connection is back to its own origin.

ECharts comes from npm (``services/stats/web/package.json`` and its lock, installed by ``npm ci``: the
Makefile's install step, ``.ci/run`` and the image's build stage). Its file is read once at start from the
path the setting ``VRS_STATS_ECHARTS_PATH`` gives; when it is missing the page says so (503) instead of
showing empty charts.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

ECHARTS_ASSET = "echarts.min.js"

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class Page:
    html: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Script:
    body: bytes
    headers: dict[str, str]


def _hashes(html: str, tag: str) -> str:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if not bodies:
        raise ValueError(f"the dashboard has no inline <{tag}>")
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies)


def load_page(html: str) -> Page:
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return Page(html=html, headers={"Content-Security-Policy": csp, **SECURITY_HEADERS, "Cache-Control": "no-cache"})


def load_echarts(path: Path) -> Script | str:
    """The library's file, or why it cannot be served (the dashboard shows that reason)."""
    try:
        body = path.read_bytes()
    except OSError as exc:
        return (
            f"Apache ECharts was not found at {path} ({exc.strerror or exc}). Install it with "
            "`npm ci --prefix services/stats/web` (`make` does this) or set VRS_STATS_ECHARTS_PATH."
        )
    if b"echarts" not in body[:4096]:
        return f"{path} does not look like Apache ECharts; set VRS_STATS_ECHARTS_PATH to echarts.min.js"
    # Versioned by the lock file, so a day's caching is safe; a new version arrives with a deploy.
    return Script(body=body, headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"})


def unavailable_page() -> Page:
    """Shown instead of the dashboard when its chart library is missing. The server's own paths stay in its log
    (the app logs the reason at start); the page says only what an operator does about it."""
    body = (
        '<!doctype html><html lang="ja"><head><meta charset="utf-8"><title>ダッシュボードを表示できません | VRS</title>'
        "<style>body{font-family:sans-serif;margin:2rem;max-width:50rem}code{background:#eee}</style></head><body>"
        "<h1>ダッシュボードを表示できません</h1>"
        "<p>グラフ描画ライブラリ（Apache ECharts）がサーバーに見つかりません。管理者にお問い合わせください。</p>"
        "<p>The dashboard's chart library (Apache ECharts) is missing on the server: install it with "
        "<code>npm ci --prefix services/stats/web</code> or set <code>VRS_STATS_ECHARTS_PATH</code>.</p>"
        '<p>統計データ自体は <a href="/api/v1/stats/doses">/api/v1/stats/doses</a> で取得できます。</p>'
        "</body></html>"
    )
    csp = f"default-src 'none'; style-src {_hashes(body, 'style')}; base-uri 'none'; frame-ancestors 'none'"
    return Page(html=body, headers={"Content-Security-Policy": csp, **SECURITY_HEADERS, "Cache-Control": "no-cache"})


DASHBOARD = load_page(files("services.stats").joinpath("dashboard.html").read_text(encoding="utf-8"))
