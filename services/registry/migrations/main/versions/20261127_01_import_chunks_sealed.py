"""resident import uploads sealed: each piece's key id, and no compression tried on ciphertext

An upload holds My Numbers; its pieces are now AES-GCM ciphertext under the My Number keys (``key_id``).
Pieces stored before this revision have no key id and are read as they are until their import ends. Ciphertext
does not compress, so on PostgreSQL the pieces are stored out of line without trying (``STORAGE EXTERNAL``).

Revision ID: 20261127_01
Revises: 20261126_01
Create Date: 2026-11-27 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261127_01"
down_revision: str | None = "20261126_01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("resident_import_chunks") as batch:
        batch.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE resident_import_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE resident_import_chunks ALTER COLUMN data SET STORAGE EXTENDED")
    with op.batch_alter_table("resident_import_chunks") as batch:
        batch.drop_column("key_id")
