"""The test harness itself: real PostgreSQL and Kafka servers that keep their data through stops and crashes,
and that take over what a killed earlier run left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devtools.harness import PROJECT_ROOT, free_port, pid_alive
from devtools.harness.kafka import KafkaServer
from devtools.harness.postgres import PostgresError, PostgresServer, WalStream, restore_cluster


def run_and_get_killed(code: str) -> None:
    """Run ``code`` in a Python process that then SIGKILLs itself: a supervisor dying without cleanup."""
    script = textwrap.dedent(code) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, check=False, timeout=180)
    assert result.returncode == -9


# -- PostgreSQL ------------------------------------------------------------------------------------------


async def test_postgres_serves_databases_through_asyncpg(pg_server: PostgresServer) -> None:
    pg_server.create_database("harness_db")
    pg_server.create_database("harness_db")  # idempotent
    assert pg_server.execute("SELECT datname FROM pg_database WHERE datname = 'harness_db'") == "harness_db"
    assert pg_server.dsn("harness_db") == f"postgresql+asyncpg://vrs@127.0.0.1:{pg_server.port}/harness_db"

    engine = create_async_engine(pg_server.dsn("harness_db"))
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW fsync"))).scalar_one() == "on"
            assert (await conn.execute(text("SHOW max_connections"))).scalar_one() == "300"
            assert (await conn.execute(text("SHOW listen_addresses"))).scalar_one() == "127.0.0.1"
    finally:
        await engine.dispose()


def test_postgres_keeps_committed_data_through_stop_and_sigkill(pg_bindir: Path, server_dir: Path) -> None:
    server = PostgresServer(server_dir / "data", free_port())
    try:
        started = time.monotonic()
        server.start()
        print(f"postgres: initdb + start {time.monotonic() - started:.2f} s")
        server.create_database("durable")
        server.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)", "durable")

        server_dir.chmod(0o700)  # as pytest does to its temp root: stop must not need the path, start fixes it
        server.stop()
        server.stop()  # stopping a stopped server is fine
        started = time.monotonic()
        server.start()
        print(f"postgres: start after stop {time.monotonic() - started:.2f} s")
        server.execute("INSERT INTO t VALUES (2)", "durable")

        crashed_pid = server.pid
        server.kill()
        assert crashed_pid is not None and not pid_alive(crashed_pid)
        assert (server_dir / "data" / "postmaster.pid").exists()  # stale, and must not stop the next start
        started = time.monotonic()
        server.start()
        print(f"postgres: start after SIGKILL (crash recovery) {time.monotonic() - started:.2f} s")
        assert server.execute("SELECT string_agg(n::text, ',' ORDER BY n) FROM t", "durable") == "1,2"

        crashed_pid = server.pid
        server.stop(discard=True)  # the end of a session: no shutdown checkpoint, the data goes anyway
        assert crashed_pid is not None and not pid_alive(crashed_pid)
        assert "received immediate shutdown request" in server.log_path.read_text()
    finally:
        server.stop()


def test_postgres_restores_a_lost_cluster_from_a_base_backup_and_its_wal_stream(
    pg_bindir: Path, server_dir: Path
) -> None:
    """What a client saw committed after the base backup exists only in the streamed WAL: a restore has it,
    the still-open segment included; a cluster's synchronous commits wait for the stream."""
    server = PostgresServer(server_dir / "pg", free_port(), settings=WalStream.server_settings())
    stream = WalStream(server, server_dir / "wal")
    server.start()
    try:
        stream.start()
        server.create_database("d")
        server.execute("CREATE TABLE t (i int PRIMARY KEY)", "d")
        server.execute("INSERT INTO t SELECT generate_series(1, 100)", "d")
        server.base_backup(server_dir / "base")
        for i in range(101, 121):  # one commit each, acknowledged only once the stream has flushed it
            server.execute(f"INSERT INTO t VALUES ({i})", "d")
        assert server.execute("SELECT sync_state FROM pg_stat_replication") == "sync"
    finally:
        server.kill()
        stream.wait_exit()
    shutil.rmtree(server.data_dir)
    assert list((server_dir / "wal").glob("*.partial")), "the open segment is streamed too"

    restored = restore_cluster(server_dir / "base", server_dir / "wal", server_dir / "restored", free_port())
    try:
        assert restored.execute("SELECT count(*), max(i) FROM t", "d") == "120|120"
        restored.execute("INSERT INTO t VALUES (121)", "d")  # promoted: it takes writes
        assert restored.port != server.port
    finally:
        restored.stop()
    with pytest.raises(PostgresError, match="fresh directory"):
        restore_cluster(server_dir / "base", server_dir / "wal", server_dir / "restored", free_port())


def test_postgres_takes_over_a_server_left_by_a_killed_run(pg_bindir: Path, server_dir: Path) -> None:
    data, port = server_dir / "data", free_port()
    run_and_get_killed(
        f"""
        from pathlib import Path
        from devtools.harness.postgres import PostgresError, PostgresServer, WalStream, restore_cluster
        server = PostgresServer(Path({str(data)!r}), {port})
        server.start()
        server.create_database("left")
        """
    )
    leftover = PostgresServer(data, port)
    leftover_pid = leftover.pid
    assert leftover_pid is not None and pid_alive(leftover_pid)  # still running, nobody owns it

    same_port = PostgresServer(data, port)
    same_port.start()
    assert same_port.pid == leftover_pid  # reused as it is
    assert same_port.execute("SELECT 1", "left") == "1"

    other_port = PostgresServer(data, free_port())
    try:
        other_port.start()  # the leftover serves another port: it is stopped and the cluster restarted
        assert other_port.pid != leftover_pid and not pid_alive(leftover_pid)
        assert other_port.execute("SELECT 1", "left") == "1"
    finally:
        other_port.stop()


# -- Kafka -----------------------------------------------------------------------------------------------


def produce(server: KafkaServer, topic: str, messages: list[tuple[str, str]]) -> None:
    producer = KafkaProducer(bootstrap_servers=server.bootstrap_servers, enable_idempotence=True, acks="all")
    try:
        futures = [producer.send(topic, key=k.encode(), value=v.encode()) for k, v in messages]
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def consume_all(server: KafkaServer, topic: str, partitions: list[int]) -> dict[int, list[Any]]:
    """Every record of the topic, per partition, read from offset 0 up to the end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=server.bootstrap_servers, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: dict[int, list[Any]] = defaultdict(list)
        deadline = time.monotonic() + 60
        while any(len(records[tp.partition]) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition].extend(batch)
        return records
    finally:
        consumer.close()


def test_kafka_keeps_acknowledged_messages_through_sigkill_and_restart(kafka_lib: Path, server_dir: Path) -> None:
    server = KafkaServer(server_dir / "data", free_port(), free_port())
    try:
        started = time.monotonic()
        server.start()
        print(f"kafka: format + start {time.monotonic() - started:.2f} s")
        partitions = server.create_topic("durable", 4)
        assert partitions == [0, 1, 2, 3]
        assert server.create_topic("durable", 4) == partitions  # idempotent
        sent = [(f"key-{i % 10}", f"message-{i}") for i in range(300)]
        produce(server, "durable", sent)

        crashed_pid = server.pid
        server.kill()
        assert crashed_pid is not None and not pid_alive(crashed_pid)
        started = time.monotonic()
        server.start()
        print(f"kafka: start after SIGKILL {time.monotonic() - started:.2f} s")
        produce(server, "durable", [("key-0", "after-crash")])

        server.stop()
        started = time.monotonic()
        server.start()
        print(f"kafka: start after stop {time.monotonic() - started:.2f} s")

        records = consume_all(server, "durable", partitions)
        received = [(r.key.decode(), r.value.decode()) for batch in records.values() for r in batch]
        assert sorted(received) == sorted([*sent, ("key-0", "after-crash")])
        for batch in records.values():
            assert [r.offset for r in batch] == list(range(len(batch)))  # nothing lost, nothing reordered
        for key in {k for k, _ in sent}:  # per key, in the order sent
            expected = [v for k, v in sent if k == key]
            got = [v for k, v in received if k == key and v != "after-crash"]
            assert got == expected
    finally:
        server.stop()


def test_kafka_takes_over_a_broker_left_by_a_killed_run(kafka_lib: Path, server_dir: Path) -> None:
    data, port, controller_port = server_dir / "data", free_port(), free_port()
    run_and_get_killed(
        f"""
        from pathlib import Path
        from devtools.harness.kafka import KafkaServer
        KafkaServer(Path({str(data)!r}), {port}, {controller_port}).start()
        """
    )
    leftover_pid = int((data / "kafka.pid").read_text())
    assert pid_alive(leftover_pid)  # still running, nobody owns it

    same_config = KafkaServer(data, port, controller_port)
    same_config.start()
    assert same_config.pid == leftover_pid  # reused as it is
    same_config.create_topic("left", 1)

    other_ports = KafkaServer(data, free_port(), free_port())
    try:
        other_ports.start()  # the leftover listens elsewhere: it is stopped and the broker restarted
        assert other_ports.pid != leftover_pid and not pid_alive(leftover_pid)
        assert other_ports.create_topic("left", 1) == [0]
    finally:
        other_ports.stop()
        same_config.stop()
    assert not (data / "kafka.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand the data directory to postgres")
def test_postgres_data_directory_belongs_to_the_postgres_user(pg_server: PostgresServer) -> None:
    import pwd

    owner = pwd.getpwuid(pg_server.data_dir.stat().st_uid).pw_name
    assert owner == "postgres"
    assert pg_server.data_dir.stat().st_mode & 0o777 == 0o700
