"""A single-node Apache Kafka broker (KRaft, broker and controller in one JVM) in a directory.

The broker's jars come from Maven Central through Maven (``kafka-pom.xml`` next to this file) and are
cached in ``<project>/.cache/kafka/<version>/lib``; they are fetched only once (a marker file records a
complete fetch). Pre-fetch them with::

    python -m devtools.harness.kafka fetch

Everything the broker keeps lives in ``data_dir``: ``server.properties``, the KRaft log directory
(``kraft/``), ``server.log`` (the broker's own log, unless ``log_path`` says otherwise), ``kafka.out``
(the JVM's console) and ``kafka.pid``. Messages acknowledged with ``acks=all`` survive the broker being
killed: Kafka recovers its log segments from the page cache on the next start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from devtools.harness import PROJECT_ROOT, kill_quietly, pid_alive, tail, wait_for_exit

# 4.1.x: KRaft only (no ZooKeeper left), runs on Java 17 (its minimum for brokers), and is well inside the
# range kafka-python 3.0.12 knows (up to 4.3). Keep the default in kafka-pom.xml in step.
KAFKA_VERSION = "4.1.2"
POM = Path(__file__).with_name("kafka-pom.xml")
_MARKER = "FETCHED"
_MAIN = "kafka.Kafka"
_HEAP = ["-Xms256m", "-Xmx512m"]


class KafkaError(RuntimeError):
    pass


# -- the jars ----------------------------------------------------------------------------------------------


def default_cache_dir(version: str = KAFKA_VERSION) -> Path:
    return PROJECT_ROOT / ".cache" / "kafka" / version


def cached_lib(cache_dir: Path | None = None) -> Path | None:
    """The directory of jars if a complete fetch is cached, else ``None``."""
    cache_dir = cache_dir or default_cache_dir()
    return cache_dir / "lib" if (cache_dir / _MARKER).is_file() else None


def java_executable() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def missing_prerequisites(cache_dir: Path | None = None) -> str | None:
    """Why a broker cannot be started here (no Java; no jars and no Maven to fetch them), or ``None``."""
    if java_executable() is None:
        return "Java is not installed (a JRE >= 17 is needed for the Kafka broker)"
    if cached_lib(cache_dir) is None and shutil.which("mvn") is None:
        return f"the Kafka jars are not cached in {cache_dir or default_cache_dir()} and Maven is not installed"
    return None


def fetch_jars(cache_dir: Path | None = None, version: str = KAFKA_VERSION) -> Path:
    """Fetch the broker's jars with Maven unless already cached; return the directory holding them."""
    cache_dir = (cache_dir or default_cache_dir(version)).absolute()
    lib = cached_lib(cache_dir)
    if lib is not None:
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError("Maven (mvn) is needed to fetch the Kafka jars")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same version
        lib = cached_lib(cache_dir)
        if lib is not None:
            return lib
        lib, scratch = cache_dir / "lib", cache_dir / "lib.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                f"-Dkafka.version={version}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={scratch}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            timeout=900,
        )
        if result.returncode != 0 or not any(scratch.glob("kafka_2.13-*.jar")):
            raise KafkaError(f"fetching the Kafka {version} jars with Maven failed:\n{result.stdout[-4000:]}")
        shutil.rmtree(lib, ignore_errors=True)
        scratch.rename(lib)
        (cache_dir / _MARKER).write_text(f"kafka {version}\n")
        return lib


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal the broker's process group (it leads one), or just the process if it leads none."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        kill_quietly(pid, sig)


def _new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's Uuid format). Like
    Kafka's own ``Uuid.randomUuid``, never one starting with "-", which command lines take for an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


# -- the broker --------------------------------------------------------------------------------------------


class KafkaServer:
    """A single-node KRaft broker in ``data_dir`` serving ``127.0.0.1:port`` (controller on ``controller_port``)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        controller_port: int,
        cache_dir: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.controller_port = controller_port
        self.cache_dir = cache_dir
        self.log_path = Path(log_path).absolute() if log_path else self.data_dir / "server.log"
        self._props = self.data_dir / "server.properties"
        self._log4j = self.data_dir / "log4j2.properties"
        self._kraft_dir = self.data_dir / "kraft"
        self._pid_file = self.data_dir / "kafka.pid"
        self._console = self.data_dir / "kafka.out"
        self._proc: subprocess.Popen[bytes] | None = None
        self._console_file: IO[bytes] | None = None
        self._pid: int | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker JVM's pid while it runs."""
        return self._pid if self._pid is not None and pid_alive(self._pid) else None

    def start(self, timeout: float = 60) -> None:
        """Start the broker (formatting the storage on first use) and return once clients can use it.

        A broker still running on this data directory from an earlier run is reused when its
        configuration is the one we would write, and is stopped otherwise.
        """
        java = java_executable()
        if java is None:
            raise KafkaError("Java is not installed (a JRE >= 17 is needed for the Kafka broker)")
        lib = fetch_jars(self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._reap()
        properties = self._properties()
        running = self._running_brokers()
        if running:
            same_config = self._props.is_file() and self._props.read_text() == properties
            if same_config and len(running) == 1 and self._adopt(running[0]):
                return
            self._terminate(running)
            self._forget()
        self._props.write_text(properties)
        self._log4j.write_text(self._log4j_properties())
        if not (self._kraft_dir / "meta.properties").is_file():
            self._format(java, lib)
        self._spawn(java, lib)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=10)  # do not leave a broker that never became ready running
            raise

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL if the broker has not exited after ``timeout`` s."""
        self._terminate(self._our_pids(), timeout)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (for tests)."""
        pids = self._our_pids()
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        self._wait_gone(pids, 30)
        self._forget()

    def create_topic(self, name: str, partitions: int) -> list[int]:
        """Create a topic unless it exists (same settings as the bus creates); return its partition ids."""
        from shared.bus.kafka import ensure_topic

        return ensure_topic(self.bootstrap_servers, name, partitions, client_id="vrs-harness")

    # -- configuration ---------------------------------------------------------------------------------

    def _properties(self) -> str:
        settings: dict[str, Any] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self._kraft_dir,
            "num.partitions": 4,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "auto.create.topics.enable": "false",
            "group.initial.rebalance.delay.ms": 0,
            # After a crash the restarted broker may only register once the controller has fenced its
            # previous incarnation, i.e. after this timeout (default 9 s). Broker and controller share
            # one JVM here, so a short session cannot be cut by the network.
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 500,
            # The event log is replayed from the start to rebuild stats: keep everything.
            "log.retention.ms": -1,
            # The default 128 MiB dedupe buffer is a quarter of our heap; compaction here is tiny.
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _log4j_properties(self) -> str:
        # A size-capped file: a long-lived data directory (make run-full) must not grow a log forever.
        return (
            "status = warn\n"
            "shutdownHook = disable\n"
            "appender.file.type = RollingFile\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.log_path}\n"
            f"appender.file.filePattern = {self.log_path}.%i\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "appender.file.policies.type = Policies\n"
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy\n"
            "appender.file.policies.size.size = 10MB\n"
            "appender.file.strategy.type = DefaultRolloverStrategy\n"
            "appender.file.strategy.max = 3\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
        )

    def _java_command(self, java: str, lib: Path, *args: str) -> list[str]:
        return [
            java,
            *_HEAP,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j}",
            "-cp",
            f"{lib}/*",
            *args,
        ]

    def _format(self, java: str, lib: Path) -> None:
        id_file = self.data_dir / "cluster.id"
        if not id_file.is_file() or id_file.read_text().startswith("-"):  # the latter never got formatted
            id_file.write_text(_new_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        result = subprocess.run(
            self._java_command(
                java, lib, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self._props)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise KafkaError(f"formatting the Kafka storage in {self._kraft_dir} failed:\n{result.stdout}")

    # -- the process -----------------------------------------------------------------------------------

    def _spawn(self, java: str, lib: Path) -> None:
        self._console_file = self._console.open("ab")
        self._proc = subprocess.Popen(
            self._java_command(java, lib, _MAIN, str(self._props)),
            stdin=subprocess.DEVNULL,
            stdout=self._console_file,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # its own process group: our Ctrl-C is not its Ctrl-C
        )
        self._pid = self._proc.pid
        self._pid_file.write_text(f"{self._pid}\n")

    def _running_brokers(self) -> list[int]:
        """Broker JVMs running on this data directory's configuration (found in /proc, not the pid file,
        which may be stale or missing)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if _MAIN.encode() in argv and str(self._props).encode() in argv and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _adopt(self, pid: int) -> bool:
        self._pid = pid
        self._pid_file.write_text(f"{pid}\n")
        try:
            self._wait_ready(timeout=30)
        except KafkaError:
            self._pid = None
            return False
        return True

    def _our_pids(self) -> list[int]:
        pid = self.pid
        return [pid] if pid is not None else self._running_brokers()

    def _terminate(self, pids: list[int], timeout: float = 30) -> None:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        if not self._wait_gone(pids, timeout):
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            self._wait_gone(pids, 30)

    def _wait_gone(self, pids: list[int], timeout: float) -> bool:
        if self._proc is not None and self._proc.pid in pids:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        return wait_for_exit(pids, timeout)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._forget()

    def _forget(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1)
        self._proc = None
        self._pid = None
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()

    def _wait_ready(self, timeout: float) -> None:
        """Until a kafka-python client gets metadata and every partition has a leader."""
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid is None:
                raise KafkaError(f"the Kafka broker exited during startup{self._logs()}")
            # The broker opens its client port only once it is ready: poll it cheaply first, as the
            # client's reconnect backoff would otherwise stretch the wait by seconds.
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers,
                    client_id="vrs-harness",
                    bootstrap_timeout_ms=min(5000, remaining_ms),
                    request_timeout_ms=5000,
                    reconnect_backoff_max_ms=250,
                )
                try:
                    topics = admin.list_topics()
                    if topics:
                        admin.wait_for_topics(topics, timeout_ms=remaining_ms)
                finally:
                    admin.close()
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.2)
        raise KafkaError(f"the Kafka broker was not ready after {timeout:.0f} s ({last_error!r}){self._logs()}")

    def _logs(self) -> str:
        return f"\n--- {self.log_path} ---\n{tail(self.log_path)}\n--- {self._console} ---\n{tail(self._console, 20)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.harness.kafka", description="Kafka test harness")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch the broker's jars into the cache (no-op when cached)")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    fetch.add_argument("--version", default=KAFKA_VERSION)
    args = parser.parse_args(argv)
    started = time.monotonic()
    lib = fetch_jars(args.cache_dir, args.version)
    print(f"Kafka {args.version} jars in {lib} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
