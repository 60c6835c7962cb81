"""The paper 接種証明書: one A4 page, Japanese with the English terms beside them, the card's QR on it.

The font is embedded (a subset of a TrueType font from Debian, IPAex Gothic by default), so the page
prints the same everywhere and its text can be extracted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Paragraph, Table, TableStyle

from services.registry.fhir import VACCINES, Dose
from services.registry.qr import qr_image
from shared.domain.vaccines import default_rules

FONT = "VRSCertificateFont"
LEFT = 20 * mm
PERSON_COLUMNS = (62 * mm, 108 * mm)  # also the issuer table's
DOSE_COLUMNS = (30 * mm, 28 * mm, 82 * mm, 30 * mm)
FOOTER = 20 * mm  # the certifying sentence's baseline, from the page's bottom edge


@dataclass(frozen=True, slots=True)
class CertificateView:
    certificate_id: str
    name: str
    name_kana: str
    birth_date: date | None
    municipality_name: str
    issued_on: date
    doses: Sequence[Dose]
    shc: str
    doses_on_card: int | None = None  # the QR code holds only the latest this many of ``doses``; None: all


@cache
def _register_font(path: Path) -> str:
    name = f"{FONT}-{path.stem}"
    pdfmetrics.registerFont(TTFont(name, str(path)))
    return name


def _product(code: str) -> str:
    products = default_rules().products
    japanese = products[code].label if code in products else code
    english = VACCINES[code].english if code in VACCINES else code
    return f"{japanese} / {english}"


def render(view: CertificateView, *, font_path: Path) -> bytes:
    font = _register_font(font_path)
    buffer = io.BytesIO()
    width, height = A4
    # The initial font too, or the page would reference a Helvetica that is not embedded.
    # invariant: no creation time or random document id, so the same certificate is the same file.
    canvas = Canvas(buffer, pagesize=A4, pageCompression=1, initialFontName=font, initialFontSize=10, invariant=True)
    canvas.setTitle(f"接種証明書 Vaccination Certificate {view.certificate_id}")
    canvas.setAuthor(view.municipality_name)

    canvas.setFont(font, 20)
    canvas.drawCentredString(width / 2, height - 30 * mm, "新型コロナウイルス感染症 予防接種証明書")
    canvas.setFont(font, 13)
    canvas.drawCentredString(width / 2, height - 38 * mm, "Vaccination Certificate of COVID-19")

    person = _table(
        [
            ["氏名 / Name", view.name],
            ["氏名カナ / Name (kana)", view.name_kana],
            ["生年月日 / Date of birth", view.birth_date.isoformat() if view.birth_date else "不明 / Unknown"],
        ],
        PERSON_COLUMNS,
        font,
        header=False,
    )
    person_bottom = _place(canvas, person, LEFT, height - 48 * mm)

    rows = [["回数 / Dose", "接種日 / Date", "ワクチン / Vaccine", "ロット番号 / Lot"]]
    rows += [
        [f"{d.dose_number}回目 / No. {d.dose_number}", d.vaccinated_on.isoformat(), _product(d.vaccine), d.lot_number]
        for d in view.doses
    ]
    doses = _table(rows, DOSE_COLUMNS, font, header=True, size=8.5)
    # Where the usual page has them; lower when a long name or kana took more lines.
    doses_bottom = _place(canvas, doses, LEFT, min(height - 78 * mm, person_bottom - 8 * mm))

    issuer = _table(
        [
            ["発行自治体 / Issuing municipality", view.municipality_name],
            ["発行年月日 / Date of issue", view.issued_on.isoformat()],
            ["証明書番号 / Certificate ID", view.certificate_id],
        ],
        PERSON_COLUMNS,
        font,
        header=False,
    )
    issuer_bottom = _place(canvas, issuer, LEFT, doses_bottom - 8 * mm)

    qr_size = 70 * mm
    qr_top = min(issuer_bottom - 12 * mm, doses_bottom - 38 * mm)
    if qr_top - qr_size - 12 * mm < FOOTER + 8 * mm:
        # The longest names and ten doses fill the page: the QR code, whole, goes on the next one.
        canvas.showPage()
        qr_top = height - 30 * mm
    canvas.drawImage(
        ImageReader(qr_image(view.shc, box_size=8)),
        (width - qr_size) / 2,
        qr_top - qr_size,
        qr_size,
        qr_size,
    )
    canvas.setFont(font, 9)
    canvas.drawCentredString(
        width / 2,
        qr_top - qr_size - 5 * mm,
        "SMART Health Card — 検証アプリで読み取れます / Scan with any SMART Health Card verifier",
    )
    if view.doses_on_card is not None and view.doses_on_card < len(view.doses):
        canvas.drawCentredString(
            width / 2,
            qr_top - qr_size - 10 * mm,
            f"QRコードには直近{view.doses_on_card}回分の接種を収録 / "
            f"The QR code holds the latest {view.doses_on_card} of the {len(view.doses)} doses",
        )
    canvas.drawCentredString(
        width / 2,
        FOOTER,
        "上記のとおり予防接種を受けたことを証明します。 / This is to certify that the above person was vaccinated.",
    )
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def _table(rows: list[list[str]], columns: Sequence[float], font: str, *, header: bool, size: float = 10) -> Table:
    """Each cell's text wrapped to its column, between any two characters (wordWrap CJK): a 20-character lot
    or a 100-character name has no space to break at, and must not cross the cell's border."""
    style = ParagraphStyle("cell", fontName=font, fontSize=size, leading=size * 1.25, wordWrap="CJK")
    table = Table([[Paragraph(escape(text), style) for text in row] for row in rows], colWidths=list(columns))
    table.setStyle(_style(font, header=header))
    return table


def _style(font: str, *, header: bool) -> TableStyle:
    commands: list[tuple[object, ...]] = [
        ("FONT", (0, 0), (-1, -1), font),  # the cells' paragraphs have theirs; this keeps Helvetica off the page
        ("GRID", (0, 0), (-1, -1), 0.5, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 5),
    ]
    if header:
        commands.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef7")))
    else:
        commands.append(("BACKGROUND", (0, 0), (0, -1), colors.HexColor("#e8eef7")))
    return TableStyle(commands)


def _place(canvas: Canvas, table: Table, x: float, top: float) -> float:
    """Draws ``table`` with its top edge at ``top``; returns where its bottom edge is."""
    _, h = table.wrap(0, 0)
    table.drawOn(canvas, x, top - h)
    return float(top - h)
