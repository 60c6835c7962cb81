"""``devtools.replicas``: a service's processes each on a listening socket of their own, so that a burst of new
connections (the gateway opening its pool) reaches all of them, and one signal stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from devtools.harness import PROJECT_ROOT, free_port, pid_alive


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the pid of the process that accepted the connection."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


def get(url: str) -> str:
    return httpx.get(url, timeout=5).text  # a new connection each time


def test_new_connections_reach_every_replica_and_a_sigterm_stops_them_all() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "devtools.replicas", "2", "tests.integration.devtools.test_replicas:app",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        pids: set[str] = set()
        while len(pids) < 2:
            assert time.monotonic() < deadline, f"connections reached only {pids}"
            try:
                pids |= {get(url) for _ in range(20)}  # 20 connections: all in one of two by chance, 1 in 500,000
            except httpx.TransportError:
                time.sleep(0.2)  # not listening yet
        assert wrapper.pid not in {int(p) for p in pids}  # the wrapper only starts them
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0
        assert not any(pid_alive(int(p)) for p in pids)
    finally:
        if wrapper.poll() is None:
            wrapper.send_signal(signal.SIGTERM)  # passed on to the replicas
            wrapper.wait(timeout=30)
