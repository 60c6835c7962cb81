"""``vrs run``: every service as its own process on one machine, stopped together on Ctrl-C.

Embedded (default): SQLite files and the embedded event log under ``var/``.
Full (``--full``): a local PostgreSQL (one database per shard) and a single-node Kafka broker under
``var/``, started by the same harness the tests use, and stopped after the services.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devtools.stack import BY_NAME, PORTS, SERVICES, TOPICS, migrate_all, postgres_databases, postgres_env, wiring_env
from services.gateway.server import UVICORN_OPTIONS as GATEWAY_UVICORN_OPTIONS

# Fixed ports for `make run-full`, so that a restart finds the same servers and data.
FULL_POSTGRES_PORT = 55432
# uvicorn's HTTP protocol options of a service, when not plain httptools (services/gateway/server.py).
SERVER_OPTIONS = {"gateway": GATEWAY_UVICORN_OPTIONS}
FULL_KAFKA_PORT = 59092
FULL_KAFKA_CONTROLLER_PORT = 59093


@dataclass
class Stack:
    """Service processes started from one environment; also used by the end-to-end tests."""

    env: dict[str, str]
    ports: dict[str, int]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # processes per service (1 when not named; see devtools.replicas): production runs several replicas of an API, and
    # one Python process uses one core at most
    replicas: dict[str, int] = field(default_factory=dict)

    def url(self, service: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self, *, timeout: float = 60.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in SERVICES:  # the gateway last: it is ready only when what it fronts is
            self.start_service(spec.name)
        for spec in SERVICES:
            self.wait_healthy(spec.name, timeout=timeout)

    def _pid_file(self, name: str) -> Path:
        return self.log_dir.parent / "run" / f"{name}.pid"

    def _kill_leftover(self, name: str) -> None:
        """A service left running by a launcher that was killed would hold the port: end it first."""
        pid_file = self._pid_file(name)
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if f"services.{name}.app".encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        pid_file.unlink(missing_ok=True)

    def start_service(self, name: str) -> None:
        self._kill_leftover(name)
        log = (self.log_dir / f"{name}.log").open("ab")
        replicas = self.replicas.get(name, 1)
        # Several processes: each on a listening socket of its own (devtools.replicas), not uvicorn's --workers,
        # whose shared socket hands a burst of new connections to one process.
        server = ["devtools.replicas", str(replicas)] if replicas > 1 else ["uvicorn"]
        self.processes[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *server,
                f"services.{name}.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports[name]),
                "--loop",
                "uvloop",
                *SERVER_OPTIONS.get(name, ["--http", "httptools"]),
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "10",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches only the launcher, which stops services in order.
            start_new_session=True,
        )
        self._pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        self._pid_file(name).write_text(str(self.processes[name].pid))

    def start_worker(self, name: str, *args: str) -> None:
        """A ``vrs`` worker process (``relay records``, ``consume stats``, ...) named ``name``."""
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, name: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.ports[name]}/healthz"
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {self.log_dir / (name + '.log')}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become healthy in {timeout:.0f}s; see {self.log_dir / (name + '.log')}")

    def stop_service(self, name: str, *, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        self._pid_file(name).unlink(missing_ok=True)
        if process is None or process.poll() is not None:
            return
        if self.replicas.get(name, 1) > 1 and sig not in (signal.SIGTERM, signal.SIGINT):
            os.killpg(process.pid, sig)  # the replicas too: a SIGKILL would not reach them through devtools.replicas
        else:
            process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        services = [spec.name for spec in SERVICES]
        for name in [n for n in self.processes if n not in services]:  # workers first
            self.stop_service(name)
        for name in reversed(services):
            self.stop_service(name)

    def exited(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]


def embedded_env(var: Path) -> dict[str, str]:
    return {"VRS_VAR_DIR": str(var), "VRS_BUS_KIND": "embedded"}


@contextlib.contextmanager
def full_infrastructure(var: Path) -> Iterator[dict[str, str]]:
    """PostgreSQL + Kafka under ``var/``; yields the production environment pointing at them."""
    from devtools.harness.kafka import KafkaServer
    from devtools.harness.postgres import PostgresServer

    pg = PostgresServer(var / "postgres", FULL_POSTGRES_PORT, log_path=var / "log" / "postgres.log")
    kafka = KafkaServer(var / "kafka", FULL_KAFKA_PORT, FULL_KAFKA_CONTROLLER_PORT, log_path=var / "log" / "kafka.log")
    print("Starting PostgreSQL and Kafka under var/ ...", flush=True)
    pg.start()
    try:
        kafka.start()
        try:
            for name in postgres_databases():
                pg.create_database(name)
            env = postgres_env(pg.dsn, kafka_bootstrap=kafka.bootstrap_servers)
            for topic, partitions in TOPICS.items():
                kafka.create_topic(topic, partitions)
            yield env
        finally:
            kafka.stop()
    finally:
        pg.stop()


def run(*, full: bool, var: Path, seed: bool = True) -> int:
    var = var.resolve()
    var.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, **embedded_env(var), "VRS_ENVIRONMENT": "development"}
    ports = dict(PORTS)

    def on_signal(signum: int, _: object) -> None:
        # Ctrl-C, SIGTERM and a closed terminal all unwind the same way: services, then Kafka, then PostgreSQL.
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with contextlib.ExitStack() as stack:
        if full:
            base.update(stack.enter_context(full_infrastructure(var)))
        env = {**base, **wiring_env(ports)}
        os.environ.update(env)
        print("Applying migrations ...", flush=True)
        migrate_all()
        services = Stack(env=env, ports=ports, log_dir=var / "log")
        stack.callback(services.stop)
        print("Starting services ...", flush=True)
        services.start()
        if seed:
            from devtools.demo import seed_demo

            print("Seeding demo data (idempotent) ...", flush=True)
            seed_demo(services.url())
        print_banner(services, full=full, var=var)
        try:
            while not (dead := services.exited()):
                time.sleep(0.5)
            print(f"\n{', '.join(dead)} stopped unexpectedly; see {var / 'log'}. Stopping.", flush=True)
            return 1
        except KeyboardInterrupt:
            print("\nStopping ...", flush=True)
    return 0


def print_banner(services: Stack, *, full: bool, var: Path) -> None:
    gw = services.url()
    mode = "PostgreSQL (2 shards) + Kafka" if full else "embedded (SQLite + event log)"
    vrs = Path(sys.executable).parent / "vrs"
    print(
        f"""
VRS is running — {mode}; data in {var}
  Dashboard     {gw}/dashboard
  API           {gw}/api/v1/...   (health: {gw}/healthz)
  API docs      {gw}/docs   (OpenAPI: {gw}/openapi.json; the services answer only the gateway)
  Logs          {var / "log"}

Get a token (development key):
  {vrs} token --role municipality --municipality 131016
  {vrs} token --role institution --institution 1312345678
  {vrs} token --role national

Try it:
  curl -s '{gw}/api/v1/stats/doses?group_by=date,prefecture'

Ctrl-C stops everything; data is kept for the next run.
""",
        flush=True,
    )


__all__ = ["BY_NAME", "Stack", "run"]
