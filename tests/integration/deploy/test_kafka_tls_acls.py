"""The Kafka the manifests describe, on a real broker: a TLS listener that requires a client certificate,
and exactly the ACLs of ``deploy/k8s/base/kafka/users.yaml`` — under which the bus code of each worker does
its job, and nothing else.

The broker maps a certificate's CN to the user name, as Strimzi does; the harness's plaintext port (an
``ANONYMOUS`` super user) plays the operators' part: creating the topics and the ACLs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourceType,
)
from kafka.errors import KafkaError as KafkaClientError

from devtools.harness import free_port
from devtools.harness.kafka import KafkaServer
from shared.bus import OutgoingMessage
from shared.bus.kafka import KafkaPublisher, KafkaSource
from shared.settings import BusSettings

USERS = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "base" / "kafka" / "users.yaml"
TOPICS = ("dose-events", "coupon-events")


class TlsKafkaServer(KafkaServer):
    """The harness broker plus an SSL listener with required client authentication and ACLs."""

    def __init__(self, data_dir: Path, certs: Path) -> None:
        super().__init__(data_dir, free_port(), free_port())
        self.ssl_port = free_port()
        self.certs = certs

    def _properties(self) -> str:
        props = dict(line.split("=", 1) for line in super()._properties().splitlines())
        props |= {
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},SSL://127.0.0.1:{self.ssl_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},SSL://127.0.0.1:{self.ssl_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.certs / "broker.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.certs / "ca.crt"),
            "ssl.client.auth": "required",
            "ssl.principal.mapping.rules": "RULE:^CN=(.*?)$/$1/,DEFAULT",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_certificates(directory: Path, clients: list[str]) -> None:
    """A CA, the broker's certificate for 127.0.0.1 and one client certificate per name (PEM, PKCS#8)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("vrs-test-ca"))
        .issuer_name(_name("vrs-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, *, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, pem_key

    cert, key = issue("broker", server=True)
    (directory / "broker.pem").write_bytes(key + cert)
    for client in clients:
        cert, key = issue(client, server=False)
        (directory / f"{client}.crt").write_bytes(cert)
        (directory / f"{client}.key").write_bytes(key)


def _acls() -> list[ACL]:
    """users.yaml's ACLs, as Strimzi's user operator would create them."""
    kinds = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP, "cluster": ResourceType.CLUSTER}
    acls = []
    for user in yaml.safe_load_all(USERS.read_text()):
        for rule in user["spec"]["authorization"]["acls"]:
            resource = rule["resource"]
            pattern = ResourcePattern(
                kinds[resource["type"]],
                resource.get("name", "kafka-cluster"),
                ACLResourcePatternType[resource.get("patternType", "literal").upper()],
            )
            for operation in rule["operations"]:
                op = ACLOperation["IDEMPOTENT_WRITE" if operation == "IdempotentWrite" else operation.upper()]
                acls.append(
                    ACL(f"User:{user['metadata']['name']}", rule.get("host", "*"), op, ACLPermissionType.ALLOW, pattern)
                )
    return acls


@pytest.fixture(scope="module")
def tls_kafka(kafka_lib: Path, server_root: Path) -> Iterator[TlsKafkaServer]:
    users = [u["metadata"]["name"] for u in yaml.safe_load_all(USERS.read_text())]
    certs = server_root / f"kafka-tls-certs-{free_port()}"
    _write_certificates(certs, [*users, "stranger"])
    server = TlsKafkaServer(server_root / f"kafka-tls-{free_port()}", certs)
    server.start()
    admin = KafkaAdminClient(bootstrap_servers=server.bootstrap_servers, client_id="test-operator")
    try:
        admin.create_topics([NewTopic(t, 3, 1) for t in TOPICS])
        result = admin.create_acls(_acls())
        assert not result["failed"], result["failed"]
    finally:
        admin.close()
    try:
        yield server
    finally:
        server.stop()


def _bus(server: TlsKafkaServer, user: str, topic: str, *, certificate: bool = True) -> BusSettings:
    files: dict[str, Any] = {}
    if certificate:
        files = {
            "kafka_ssl_certfile": str(server.certs / f"{user}.crt"),
            "kafka_ssl_keyfile": str(server.certs / f"{user}.key"),
        }
    return BusSettings(
        kind="kafka",
        topic=topic,
        partitions=3,
        kafka_bootstrap_servers=f"127.0.0.1:{server.ssl_port}",
        kafka_client_id=user,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(server.certs / "ca.crt"),
        **files,
    )


async def _publish(server: TlsKafkaServer, user: str, topic: str, key: str) -> None:
    publisher = KafkaPublisher(_bus(server, user, topic))
    try:
        await publisher.publish([OutgoingMessage(key=key, value=f"from {user}".encode())])
    finally:
        await publisher.close()


async def _read(server: TlsKafkaServer, user: str, topic: str) -> list[bytes]:
    source = KafkaSource(_bus(server, user, topic), consumer=user)
    try:
        await source.assign(dict.fromkeys(await source.partitions(), 0))
        values: list[bytes] = []
        for _ in range(10):
            values += [m.value for m in await source.poll(max_records=100, timeout=1.0)]
            if values:
                break
        return values
    finally:
        await source.close()


async def _read_in_group(server: TlsKafkaServer, user: str, topic: str, group: str) -> list[bytes]:
    """As the stats consumer reads: a member of ``group``, positioned where it is told, committing offsets."""
    source = KafkaSource(_bus(server, user, topic), consumer=user)
    try:
        await source.join(group)
        values: list[bytes] = []
        for _ in range(30):
            messages = await source.poll(max_records=100, timeout=1.0)
            change = source.take_assignment()
            if change is not None and change.added & change.owned:
                await source.assign(dict.fromkeys(change.added & change.owned, 0))
                continue
            values += [m.value for m in messages]
            if values:
                await source.commit({m.partition: m.offset + 1 for m in messages})
                return values
        return values
    finally:
        await source.close()


async def test_each_worker_does_its_job_over_tls(tls_kafka: TlsKafkaServer) -> None:
    await _publish(tls_kafka, "records-relay", "dose-events", "131016")
    await _publish(tls_kafka, "registry-relay", "coupon-events", "131016")
    assert b"from records-relay" in await _read_in_group(tls_kafka, "stats-consumer", "dose-events", "stats")
    assert b"from registry-relay" in await _read(tls_kafka, "records-coupon-consumer", "coupon-events")


async def test_a_group_is_only_its_consumers(tls_kafka: TlsKafkaServer) -> None:
    """No one but the stats consumers joins the group "stats", even with a topic it may read."""
    with pytest.raises(KafkaClientError, match="Authorization"):
        await _read_in_group(tls_kafka, "records-coupon-consumer", "coupon-events", "stats")


@pytest.mark.parametrize(
    ("user", "topic", "action"),
    [
        ("registry-relay", "dose-events", "publish"),  # registry writes coupon events only
        ("stats-consumer", "dose-events", "publish"),  # a consumer never writes
        ("stats-consumer", "coupon-events", "read"),  # stats reads dose events only
        ("records-relay", "coupon-events", "publish"),
        ("stranger", "dose-events", "read"),  # a valid certificate without ACLs
    ],
)
async def test_anything_else_is_refused(tls_kafka: TlsKafkaServer, user: str, topic: str, action: str) -> None:
    with pytest.raises(KafkaClientError, match="Authorization"):
        if action == "publish":
            await _publish(tls_kafka, user, topic, "131016")
        else:
            await _read(tls_kafka, user, topic)


async def test_no_client_certificate_no_connection(tls_kafka: TlsKafkaServer) -> None:
    source = KafkaSource(_bus(tls_kafka, "stats-consumer", "dose-events", certificate=False), consumer="nobody")
    try:
        with pytest.raises(KafkaClientError):
            await source.partitions()
    finally:
        await source.close()
