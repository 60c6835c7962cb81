"""SMART Health Cards, pure: the JWS (ES256, raw DEFLATE payload), the issuer's JWK set, ``rid`` and ``shc:/``.

Spec: smart-on-fhir/health-cards ("Health Cards are Compact", "Revocation", "Encoding QRs"). No I/O here;
the service decides what goes into a card and whether it is revoked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

CARD_TYPES = (
    "https://smarthealth.cards#health-card",
    "https://smarthealth.cards#immunization",
    "https://smarthealth.cards#covid19",
)
FHIR_VERSION = "4.0.1"
# A JWS longer than this does not fit one version-22 QR; chunking is deprecated by the spec.
MAX_SINGLE_QR_JWS = 1195
_NUMERIC = re.compile(r"^shc:/(\d+)$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def minified(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def deflate_raw(data: bytes) -> bytes:
    """RFC 1951 DEFLATE without zlib or gzip headers (``zip: "DEF"``)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def inflate_raw(data: bytes, *, limit: int = 1 << 20) -> bytes:
    decompressor = zlib.decompressobj(-15)
    out = decompressor.decompress(data, limit)
    if decompressor.unconsumed_tail:
        raise ValueError("payload inflates beyond the size limit")
    return out


@dataclass(frozen=True)
class IssuerKey:
    """An ES256 key with its RFC 7638 thumbprint as ``kid``."""

    private: ec.EllipticCurvePrivateKey | None
    public: ec.EllipticCurvePublicKey
    kid: str

    @classmethod
    def from_private(cls, key: ec.EllipticCurvePrivateKey) -> IssuerKey:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("an SHC issuer key must be on P-256 (ES256)")
        public = key.public_key()
        return cls(private=key, public=public, kid=thumbprint(public_jwk_members(public)))

    @classmethod
    def load(cls, text: str) -> IssuerKey:
        """A private key as PEM (PKCS#8 or SEC1) or as a JWK JSON object with ``d``."""
        text = text.strip()
        if text.startswith("{"):
            jwk = json.loads(text)
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or "d" not in jwk:
                raise ValueError("the JWK must be a private EC P-256 key (kty EC, crv P-256, d)")
            d = int.from_bytes(b64url_decode(jwk["d"]), "big")
            return cls.from_private(ec.derive_private_key(d, ec.SECP256R1()))
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the PEM must hold an EC private key")
        return cls.from_private(key)

    @classmethod
    def load_public(cls, text: str) -> IssuerKey:
        """A retired key, public part only: PEM or a JWK (``d``, if present, is ignored and never kept)."""
        text = text.strip()
        if text.startswith("{"):
            jwk = json.loads(text)
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
                raise ValueError("the JWK must be an EC P-256 key (kty EC, crv P-256)")
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(b64url_decode(jwk["x"]), "big"),
                int.from_bytes(b64url_decode(jwk["y"]), "big"),
                ec.SECP256R1(),
            )
            public = numbers.public_key()
        else:
            loaded = serialization.load_pem_public_key(text.encode())
            if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve, ec.SECP256R1):
                raise ValueError("the PEM must hold an EC P-256 public key")
            public = loaded
        return cls(private=None, public=public, kid=thumbprint(public_jwk_members(public)))

    def public_jwk(self, *, crl_version: int | None = None) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            **public_jwk_members(self.public),
            "kid": self.kid,
            "use": "sig",
            "alg": "ES256",
        }
        if crl_version is not None:
            # Tells verifiers that this key has a revocation list, and which version of it is current.
            jwk["crlVersion"] = crl_version
        return jwk


def public_jwk_members(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(members: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, lexicographic order, no whitespace."""
    canonical = json.dumps({k: members[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def revocation_id(secret: bytes, kid: str, certificate_id: str) -> str:
    """The spec's recommended ``rid``: base64url of the first 64 bits of HMAC-SHA-256(secret || kid, id)."""
    return b64url(hmac.new(secret + kid.encode(), certificate_id.encode(), hashlib.sha256).digest()[:8])


def card_payload(*, issuer: str, nbf: int, bundle: dict[str, Any], rid: str) -> dict[str, Any]:
    return {
        "iss": issuer,
        "nbf": nbf,
        "vc": {
            "type": list(CARD_TYPES),
            "credentialSubject": {"fhirVersion": FHIR_VERSION, "fhirBundle": bundle},
            "rid": rid,
        },
    }


def sign(payload: dict[str, Any], key: IssuerKey) -> str:
    """Compact JWS: header ``{"alg":"ES256","zip":"DEF","kid"}``, the minified payload raw-deflated."""
    if key.private is None:
        raise ValueError("signing needs the private key")
    header = b64url(minified({"zip": "DEF", "alg": "ES256", "kid": key.kid}))
    body = b64url(deflate_raw(minified(payload)))
    signing_input = f"{header}.{body}".encode("ascii")
    # RFC 6979 deterministic ECDSA: the same certificate is the same card, byte for byte, however often it
    # is asked for (and no signature depends on the quality of a random nonce).
    algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    r, s = decode_dss_signature(key.private.sign(signing_input, algorithm))
    # JWS wants the raw 64-byte R||S, not DER.
    return f"{header}.{body}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class CardError(ValueError):
    """A card that cannot be read or whose signature does not hold; the message is the verifier's reason."""


@dataclass(frozen=True)
class OpenedCard:
    header: dict[str, Any]
    payload: dict[str, Any]


def read_unverified(jws: str) -> OpenedCard:
    """Header and inflated payload, signature not checked yet (the ``kid`` picks the key)."""
    parts = jws.split(".")
    if len(parts) != 3:
        raise CardError("not a compact JWS (three base64url parts)")
    try:
        header = json.loads(b64url_decode(parts[0]))
    except (ValueError, UnicodeDecodeError):
        raise CardError("the JWS header is not base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "ES256" or header.get("zip") != "DEF":
        raise CardError('the JWS header must have alg "ES256" and zip "DEF"')
    try:
        payload = json.loads(inflate_raw(b64url_decode(parts[1])))
    except (ValueError, zlib.error, UnicodeDecodeError):
        raise CardError("the payload is not raw-DEFLATE compressed JSON") from None
    if not isinstance(payload, dict):
        raise CardError("the payload is not a JSON object")
    return OpenedCard(header=header, payload=payload)


def signature_holds(jws: str, public: ec.EllipticCurvePublicKey) -> bool:
    header, body, signature = jws.split(".")
    try:
        raw = b64url_decode(signature)
    except ValueError:
        return False
    if len(raw) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(der, f"{header}.{body}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def to_numeric(jws: str) -> str:
    """``shc:/`` then each character as two digits, its code minus 45 (the spec's numeric QR mode)."""
    digits = []
    for ch in jws:
        value = ord(ch) - 45
        if not 0 <= value <= 77:
            raise ValueError(f"character {ch!r} cannot appear in a compact JWS")
        digits.append(f"{value:02d}")
    return "shc:/" + "".join(digits)


def from_numeric(shc: str) -> str:
    match = _NUMERIC.match(shc.strip())
    if match is None:
        raise CardError('not a single-chunk "shc:/" numeric string')
    digits = match.group(1)
    if len(digits) % 2:
        raise CardError('an "shc:/" string has an even number of digits')
    chars = []
    for i in range(0, len(digits), 2):
        value = int(digits[i : i + 2])
        if value > 77:
            raise CardError(f'"shc:/" digit pair {digits[i : i + 2]} is out of range')
        chars.append(chr(value + 45))
    return "".join(chars)


def crl(*, kid: str, ctr: int, rids: list[str]) -> dict[str, Any]:
    return {"kid": kid, "method": "rid", "ctr": ctr, "rids": rids}
