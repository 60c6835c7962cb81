"""The Kafka clients get TLS and the client certificate exactly when the settings ask for them."""

from __future__ import annotations

from shared.bus.kafka import security_options
from shared.settings import BusSettings


def test_plaintext_by_default() -> None:
    assert security_options(BusSettings()) == {"security_protocol": "PLAINTEXT"}


def test_ssl_with_client_certificate() -> None:
    settings = BusSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile="/etc/vrs/kafka-ca/ca.crt",
        kafka_ssl_certfile="/etc/vrs/kafka-user/user.crt",
        kafka_ssl_keyfile="/etc/vrs/kafka-user/user.key",
    )
    assert security_options(settings) == {
        "security_protocol": "SSL",
        "ssl_cafile": "/etc/vrs/kafka-ca/ca.crt",
        "ssl_certfile": "/etc/vrs/kafka-user/user.crt",
        "ssl_keyfile": "/etc/vrs/kafka-user/user.key",
    }
