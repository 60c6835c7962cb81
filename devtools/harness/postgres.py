"""A PostgreSQL cluster in a directory, started from the distribution's binaries (Debian: postgresql-15).

The cluster trusts local TCP connections as the superuser ``vrs`` and listens on 127.0.0.1 only. ``fsync``
stays on: a transaction that committed survives the server being killed (and the machine losing power).

PostgreSQL refuses to run as root, so when we are root the server runs as the Debian ``postgres`` user:
the data directory is owned by it and every directory above it is made traversable (``o+x``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from devtools.harness import PROJECT_ROOT, kill_quietly, pid_alive, tail, wait_for_exit

SUPERUSER = "vrs"
SYSTEM_USER = "postgres"  # who runs the server when we are root
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"

# PostgreSQL as production configures it: the parameters of deploy/k8s's Cluster that size one server's memory and
# WAL. Its connections and archiving are not among them: the harness sets its own, and nothing archives here.
PRODUCTION_CLUSTER = PROJECT_ROOT / "deploy/k8s/base/postgres/cluster-defaults.yaml"
SERVER_PARAMETERS = ("shared_buffers", "max_wal_size", "checkpoint_timeout")


def production_pg_parameters() -> dict[str, str]:
    """:data:`SERVER_PARAMETERS` as production's Cluster sets them."""
    import yaml

    parameters = yaml.safe_load(PRODUCTION_CLUSTER.read_text())["spec"]["postgresql"]["parameters"]
    return {name: str(parameters[name]) for name in SERVER_PARAMETERS}


def production_pg_settings() -> dict[str, str]:
    """:func:`production_pg_parameters` quoted for the harness's ``postgresql.conf``."""
    return {name: f"'{value}'" for name, value in production_pg_parameters().items()}


class PostgresError(RuntimeError):
    pass


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: the newest /usr/lib/postgresql/N/bin,
    else the one ``pg_ctl`` on PATH resolves to."""

    def complete(bindir: Path) -> bool:
        return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres", "psql"))

    def major(bindir: Path) -> float:
        name = bindir.parent.name
        return float(name) if re.fullmatch(r"\d+(\.\d+)?", name) else -1.0

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True):
        if complete(bindir):
            return bindir
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        bindir = Path(on_path).resolve().parent
        if complete(bindir):
            return bindir
    return None


class PostgresServer:
    """One PostgreSQL cluster in ``data_dir`` serving on ``127.0.0.1:port``."""

    def __init__(
        self, data_dir: Path, port: int, log_path: Path | None = None, *, settings: dict[str, str] | None = None
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.log_path = Path(log_path).absolute() if log_path else self.data_dir / "postgres.log"
        # More postgresql.conf settings (values as written in the file, strings quoted).
        self.settings = dict(settings or {})
        self._bindir: Path | None = None

    # -- public API ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise the cluster if needed and start it; return once it accepts connections.

        A server already running on this data directory (left by a killed supervisor) is reused when it
        serves our port, and otherwise stopped first. Leftovers of a killed server (a stale
        ``postmaster.pid``, orphaned backends) are cleared before starting.
        """
        if self._as_root():
            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresError(f"running as root needs the {SYSTEM_USER!r} system user") from None
        self._prepare_parent(self.data_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self.data_dir.chmod(0o700)  # PostgreSQL refuses anything looser
        self._write_config()
        if self._adopt_running_server():
            return
        self._clear_leftovers()
        self._prepare_log()
        result = self._run_as_owner(
            [self._bin("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path, "-w", "-t", "120", "-s"]
        )
        if result.returncode != 0:
            with contextlib.suppress(Exception):
                self.stop()  # pg_ctl gave up waiting: do not leave a half-started server behind
            raise PostgresError(
                f"pg_ctl start failed for {self.data_dir} (port {self.port}):\n{result.stdout}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            )

    def stop(self, timeout: float = 60, *, discard: bool = False) -> None:
        """Stop the server (fast shutdown: sessions are cut, committed data is kept). No-op if not running.
        ``discard``: the data is about to be thrown away, so no shutdown checkpoint either ("immediate": at the
        end of a test session, writing back every test's databases took tens of seconds on a slow disk).

        Signals the postmaster directly rather than through ``pg_ctl``, which would have to reach the data
        directory as the postgres user: stopping must work even if a directory above it lost ``o+x``.
        """
        pid = self._running_postmaster()
        if pid is None:
            return
        kill_quietly(pid, signal.SIGQUIT if discard else signal.SIGINT)  # "immediate" or "fast" shutdown
        if not wait_for_exit([pid], timeout):
            kill_quietly(pid, signal.SIGQUIT)  # "immediate": crash recovery at the next start
            if not wait_for_exit([pid], 10):
                raise PostgresError(f"the postmaster {pid} of {self.data_dir} does not stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (for tests); its backends are left to notice."""
        pid = self.pid
        if pid is not None and pid_alive(pid):
            kill_quietly(pid, signal.SIGKILL)
            wait_for_exit([pid], timeout=10)

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """Create a database owned by ``vrs`` — a copy of the database ``template``, if given (nobody may be connected
        to that one meanwhile); nothing happens if it already exists."""
        for given in (name, template or name):
            if not _DB_NAME.match(given):
                raise ValueError(f"unsupported database name {given!r}")
        try:
            self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        except PostgresError as exc:
            if "already exists" not in str(exc):
                raise

    def execute(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through ``psql`` (unaligned, tuples only) and return its output; raise on any error."""
        result = subprocess.run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=_clean_env(),
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise PostgresError(f"psql failed on {database}: {result.stderr.strip()}")
        return result.stdout.strip()

    def base_backup(self, target: Path) -> None:
        """A physical copy of the running cluster into the empty directory ``target`` (``pg_basebackup``,
        plain format, with the WAL that makes it consistent): what a nightly backup to object storage holds."""
        target = Path(target).absolute()
        self._prepare_parent(target)
        self._make_owned_dir(target)
        result = self._run_as_owner(
            [
                self._bin("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-D",
                target,
                "--format=plain",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-password",
            ]
        )
        if result.returncode != 0:
            raise PostgresError(f"pg_basebackup of {self.data_dir} failed:\n{result.stdout}")

    def in_recovery(self) -> bool:
        return self.execute("SELECT pg_is_in_recovery()") == "t"

    def wait_promoted(self, timeout: float = 120) -> None:
        """Until a cluster started in archive recovery has replayed its WAL and accepts writes."""
        deadline = time.monotonic() + timeout
        while self.in_recovery():
            if time.monotonic() > deadline:
                raise PostgresError(f"{self.data_dir} still in recovery after {timeout:.0f} s:\n{tail(self.log_path)}")
            time.sleep(0.1)

    def dsn(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` (which may be stale), or ``None``."""
        fields = self._pidfile_fields()
        return int(fields[0]) if fields and fields[0].isdigit() else None

    # -- initialisation -------------------------------------------------------------------------------

    def _bin(self, name: str) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
            if self._bindir is None:
                raise PostgresError("PostgreSQL binaries not found (apt-get install postgresql)")
        return self._bindir / name

    def _initdb(self) -> None:
        if self.data_dir.exists():
            if any(self.data_dir.iterdir()):
                raise PostgresError(f"{self.data_dir} is neither empty nor a PostgreSQL data directory")
            self.data_dir.rmdir()
        # initdb into a scratch directory and rename it into place, so that an interrupted initdb never
        # leaves a half-made cluster where a real one is expected.
        scratch = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        self._make_owned_dir(scratch)
        result = self._run_as_owner(
            [
                self._bin("initdb"),
                "-D",
                scratch,
                "--auth=trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )
        if result.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise PostgresError(f"initdb failed for {self.data_dir}:\n{result.stdout}")
        with (scratch / "postgresql.conf").open("a") as conf:
            conf.write("\n# Settings of the VRS harness, rewritten at every start.\ninclude_if_exists = 'vrs.conf'\n")
        scratch.rename(self.data_dir)

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self._socket_dir()}'",
            "max_connections": "300",
            # Durability is the point of the exercise: never trade it for speed here.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            **self.settings,
        }
        conf = self.data_dir / "vrs.conf"
        conf.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        self._chown(conf)

    def _socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= _SOCKET_PATH_MAX - 16:
            return self.data_dir
        # Too long for a unix socket path: a short directory in /tmp, the same one at every start.
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"vrs-pg-{digest}"
        if not short.is_dir():
            self._make_owned_dir(short)
        return short

    # -- leftovers of earlier runs ---------------------------------------------------------------------

    def _pidfile_fields(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _adopt_running_server(self) -> bool:
        """Reuse a postmaster already running on this data directory, if it serves our port."""
        fields = self._pidfile_fields()
        if not fields or self._running_postmaster() is None:
            return False  # no pid file, or a stale one (the pid is dead, or now belongs to someone else)
        port_matches = len(fields) > 3 and fields[3].strip() == str(self.port)
        if port_matches and len(fields) > 7 and fields[7].strip() == "ready":
            try:
                self.execute("SELECT 1")
            except PostgresError:
                pass
            else:
                return True
        # Running but not as we want it (another port, stuck in recovery...): stop it and start afresh.
        self.stop()
        return False

    def _running_postmaster(self) -> int | None:
        """The pid in ``postmaster.pid`` if that process really is a postmaster on this data directory."""
        pid = self.pid
        return pid if pid is not None and pid in self._processes_in_data_dir() else None

    def _processes_in_data_dir(self) -> list[int]:
        """Every live process whose working directory is the data directory: a postmaster and its children."""
        data_dir, found = self.data_dir.resolve(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(os.readlink(entry / "cwd")) == data_dir and pid_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def _clear_leftovers(self) -> None:
        # Backends of a SIGKILLed postmaster notice its death and exit on their own, but until they have,
        # they pin the old shared memory and a new postmaster refuses to start.
        orphans = self._processes_in_data_dir()
        if orphans and not wait_for_exit(orphans, timeout=10):
            for pid in orphans:
                kill_quietly(pid, signal.SIGKILL)
            wait_for_exit(orphans, timeout=10)
        # Nothing runs in the data directory now, so lock files left behind are stale. PostgreSQL would
        # judge them by whether their pid exists, and a killed postmaster can linger as a zombie until
        # init reaps it (or its pid may have been reused), so remove them rather than let it guess.
        stale = [self.data_dir / "postmaster.pid", *self._socket_dir().glob(".s.PGSQL.*")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- running as the postgres user when we are root -------------------------------------------------

    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _run_as_owner(self, cmd: list[str | Path]) -> subprocess.CompletedProcess[str]:
        argv = [str(part) for part in cmd]
        if self._as_root():
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        return subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd="/",
            env=_clean_env(),
            check=False,
            timeout=300,
        )

    def _chown(self, path: Path) -> None:
        if self._as_root():
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)

    def _make_owned_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(path)
        path.chmod(0o700)

    def _prepare_parent(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._as_root():
            _make_traversable(path.parent)

    def _prepare_log(self) -> None:
        self._prepare_parent(self.log_path)
        self.log_path.touch(mode=0o600, exist_ok=True)
        self._chown(self.log_path)


class WalStream:
    """``pg_receivewal`` writing ``server``'s WAL into ``directory`` as a *synchronous* standby: a commit is
    acknowledged only once its WAL is on disk there, so a cluster restored from a base backup and this
    directory holds every transaction a client saw committed — even when the server's own disk is lost.

    The server must list the stream in ``synchronous_standby_names``: start it with
    ``settings=WalStream.server_settings()`` and start the stream before anything commits (commits wait for
    it). Completed segments have their WAL file names; the one being written ends in ``.partial``.
    """

    NAME = "vrs_wal_archive"

    def __init__(self, server: PostgresServer, directory: Path) -> None:
        self.server = server
        self.directory = Path(directory).absolute()
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def server_settings(cls) -> dict[str, str]:
        return {"synchronous_standby_names": f"'{cls.NAME}'", "wal_level": "replica"}

    def start(self, timeout: float = 30) -> None:
        server = self.server
        server._prepare_parent(self.directory)
        server._make_owned_dir(self.directory)
        connection = ["-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER, "--no-password"]
        # A slot keeps the server from recycling WAL the stream has not received (after a disconnection).
        result = server._run_as_owner(
            [server._bin("pg_receivewal"), *connection, "--slot", self.NAME, "--create-slot", "--if-not-exists"]
        )
        if result.returncode != 0:
            raise PostgresError(f"creating the replication slot failed:\n{result.stdout}")
        argv = [
            str(server._bin("pg_receivewal")),
            "-D",
            str(self.directory),
            "--slot",
            self.NAME,
            "--synchronous",
            "--no-loop",
            "-d",
            f"host=127.0.0.1 port={server.port} user={SUPERUSER} application_name={self.NAME}",
        ]
        if server._as_root():
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        log = (self.directory.parent / f"{self.directory.name}.log").open("ab")
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/", env=_clean_env()
        )
        log.close()
        deadline = time.monotonic() + timeout
        query = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{self.NAME}'"
        while server.execute(query) != "sync":
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise PostgresError(f"pg_receivewal did not become the synchronous standby of {server.data_dir}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 30) -> None:
        """Until the stream has ended (it does once its server is gone: ``--no-loop``)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def restore_cluster(
    base_backup: Path, wal_archive: Path, data_dir: Path, port: int, log_path: Path | None = None
) -> PostgresServer:
    """A new cluster in ``data_dir`` from a base backup and the WAL streamed since: archive recovery to the
    end of the WAL (the last transaction committed), then promotion. Started; returns once it takes writes.

    The segment that was still being written (``.partial``) goes into the new ``pg_wal``: recovery reads it
    there once the archive has no more complete segments — the way Barman recovers a ``receive-wal`` stream.
    """
    data_dir, wal_archive = Path(data_dir).absolute(), Path(wal_archive).absolute()
    if data_dir.exists():
        raise PostgresError(f"{data_dir} exists: restore into a fresh directory")
    server = PostgresServer(
        data_dir,
        port,
        log_path,
        settings={
            "restore_command": f'\'cp "{wal_archive}/%f" "%p"\'',
            "recovery_target_timeline": "'latest'",
        },
    )
    server._prepare_parent(data_dir)
    shutil.copytree(base_backup, data_dir, symlinks=True)
    for partial in sorted(wal_archive.glob("*.partial")):
        shutil.copyfile(partial, data_dir / "pg_wal" / partial.name.removesuffix(".partial"))
    (data_dir / "recovery.signal").touch()
    if server._as_root():
        for path in [data_dir, *data_dir.rglob("*")]:
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
    server.start()
    server.wait_promoted()
    return server


def _make_traversable(directory: Path) -> None:
    """Add ``o+x`` to ``directory`` and every directory above it, so the postgres user can reach below
    (its own directories excepted: PostgreSQL insists on 0700 for the data directory)."""
    own_uid = pwd.getpwnam(SYSTEM_USER).pw_uid
    for d in [directory, *directory.parents]:
        st = d.stat()
        if st.st_uid != own_uid and not st.st_mode & stat.S_IXOTH:
            d.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _clean_env() -> dict[str, str]:
    """Our environment without libpq/PG settings that could redirect the tools elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


__all__ = ["PostgresError", "PostgresServer", "WalStream", "find_pg_bindir", "restore_cluster"]
