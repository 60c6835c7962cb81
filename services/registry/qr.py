"""The ``shc:/`` string as a QR code and back: two segments (bytes ``shc:/``, then numeric), error level L."""

from __future__ import annotations

import io

import qrcode
import qrcode.util
import zxingcpp
from PIL import Image, UnidentifiedImageError

from services.registry.shc import MAX_SINGLE_QR_JWS, CardError

# A version-22 QR (the spec's ceiling for one card) at 4 px a module is about 450 px wide.
BOX_SIZE = 4
MAX_PNG_PIXELS = 4000 * 4000


def qr_image(shc: str, *, box_size: int = BOX_SIZE) -> Image.Image:
    if not shc.startswith("shc:/"):
        raise ValueError('expected an "shc:/" string')
    # Two digits a JWS character. Refused rather than grown: a bigger code is one that phones fail to read.
    if len(shc) - len("shc:/") > 2 * MAX_SINGLE_QR_JWS:
        raise ValueError(f"a card longer than {MAX_SINGLE_QR_JWS} JWS characters does not fit a version-22 QR code")
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=4)
    # The spec's segments: "shc:/" in byte mode, the digits in numeric mode (3.3 bits a digit, not 8).
    qr.add_data(qrcode.util.QRData(b"shc:/", mode=qrcode.util.MODE_8BIT_BYTE))
    qr.add_data(qrcode.util.QRData(shc[5:].encode("ascii"), mode=qrcode.util.MODE_NUMBER))
    qr.make(fit=True)
    # One pixel a module, then scaled: five times faster than the library's drawing of each module.
    matrix: list[list[bool]] = qr.get_matrix()
    size = len(matrix)
    modules = Image.frombytes("1", (size, size), b"".join(_row_bits(row) for row in matrix))
    return modules.resize((size * box_size, size * box_size), Image.Resampling.NEAREST)


def _row_bits(row: list[bool]) -> bytes:
    # Mode "1" packs 8 pixels a byte, most significant bit first; 1 is white, so a dark module is a 0 bit.
    padded = row + [False] * (-len(row) % 8)
    return bytes(
        sum((0 if dark else 1) << (7 - i) for i, dark in enumerate(padded[j : j + 8])) for j in range(0, len(padded), 8)
    )


def qr_png(shc: str, *, box_size: int = BOX_SIZE) -> bytes:
    buffer = io.BytesIO()
    qr_image(shc, box_size=box_size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def read_qr_png(data: bytes) -> str:
    """The one ``shc:/`` string in a picture of a QR code (a PNG of the card, or a photo of the paper)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PNG_PIXELS:
            raise CardError("the image is too large")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise CardError("the body is not a readable image") from None
    found = [r.text for r in zxingcpp.read_barcodes(image.convert("L")) if r.text.startswith("shc:/")]
    if not found:
        raise CardError('no QR code with an "shc:/" string was found in the image')
    if len(found) > 1:
        raise CardError("the image holds more than one health card QR code")
    return found[0]
