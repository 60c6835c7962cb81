"""Which headers cross the proxy."""

from __future__ import annotations

from services.gateway.proxy import FORWARDED_REQUEST_HEADERS, returned_headers
from services.gateway.router import inbound


def test_only_the_listed_request_headers_are_forwarded_and_a_request_id_is_always_set() -> None:
    scope = {
        "method": "POST",
        "path": "/api/v1/doses",
        "raw_path": b"/api/v1/doses",
        "query_string": b"a=1&b=%E3%81%82",
        "headers": [
            (b"host", b"gateway"),
            (b"authorization", b"Bearer first"),
            (b"authorization", b"Bearer second"),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"idempotency-key", b"k-1"),
            (b"x-access-purpose", b"consent"),
            (b"cookie", b"session=1"),
            (b"connection", b"keep-alive"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"accept-encoding", b"gzip"),
        ],
    }
    request = inbound(scope)
    assert set(request.headers) <= {n.decode() for n in FORWARDED_REQUEST_HEADERS}
    assert request.headers["authorization"] == "Bearer first"
    assert request.headers["idempotency-key"] == "k-1"
    assert len(request.headers["x-request-id"]) == 32
    assert request.query_string == "a=1&b=%E3%81%82"


def test_a_plain_request_id_is_kept_and_anything_else_replaced() -> None:
    def request_id(value: bytes) -> str:
        scope = {"method": "GET", "path": "/", "raw_path": b"/", "query_string": b"",
                 "headers": [(b"x-request-id", value)]}  # fmt: skip
        return inbound(scope).headers["x-request-id"]

    assert request_id(b"abc-123.4:5_6") == "abc-123.4:5_6"
    for bad in (b"", b"a b", b"x" * 129, b"<script>", "ü".encode()):
        assert request_id(bad) != bad.decode("latin-1")


def test_raw_path_keeps_its_encoding_and_loses_any_query() -> None:
    scope = {"method": "GET", "path": "/api/v1/opendata/a b", "raw_path": b"/api/v1/opendata/a%20b?x=1",
             "query_string": b"x=1", "headers": []}  # fmt: skip
    assert inbound(scope).raw_path == "/api/v1/opendata/a%20b"
    assert inbound({**scope, "raw_path": None}).raw_path == "/api/v1/opendata/a%20b"


def test_hop_by_hop_and_the_gateways_own_headers_are_not_returned() -> None:
    upstream = [
        (b"Content-Type", b"text/csv; charset=utf-8"),
        (b"Content-Length", b"10"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Tue, 24 Nov 2026 00:00:00 GMT"),
        (b"Server", b"uvicorn"),
        (b"X-Request-ID", b"upstream-made-this-up"),
        (b"Content-Encoding", b"gzip"),
        (b"Location", b"/api/v1/doses/d-1"),
        (b"WWW-Authenticate", b"Bearer"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert returned_headers(upstream) == [
        (b"Content-Type", b"text/csv; charset=utf-8"),
        (b"Content-Encoding", b"gzip"),
        (b"Location", b"/api/v1/doses/d-1"),
        (b"WWW-Authenticate", b"Bearer"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
