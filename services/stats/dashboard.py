"""The dashboard page: one self-contained HTML file, served with a Content-Security-Policy built from it.

The page's only inline script and style are allowed by their SHA-256 hashes, so nothing else — an
injected script, a CDN, a remote font — can run or load, and its only connection is back to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True)
class Page:
    html: str
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
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return Page(
        html=html,
        headers={
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


DASHBOARD = load_page(files("services.stats").joinpath("dashboard.html").read_text(encoding="utf-8"))
