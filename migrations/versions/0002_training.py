"""Training checkpoints: column runs.checkpoint (the resumable state of a training run).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "pggeolearn"


def upgrade() -> None:
    # A zip of the last finished epoch's weights, optimizer state, best weights and history,
    # written after every epoch of `pggeolearn train` and read by `--resume`.
    op.add_column("runs", sa.Column("checkpoint", sa.LargeBinary), schema=S)
    # Weights are float noise to pglz (and the checkpoint is already a zip): store them as is.
    op.execute(f"ALTER TABLE {S}.runs ALTER COLUMN checkpoint SET STORAGE EXTERNAL")
    op.execute(f"ALTER TABLE {S}.models ALTER COLUMN weights SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.models ALTER COLUMN weights SET STORAGE EXTENDED")
    op.drop_column("runs", "checkpoint", schema=S)
