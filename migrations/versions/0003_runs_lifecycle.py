"""Runs end: runs.heartbeat_at, and one running training per model (a partial unique index).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "pggeolearn"


def upgrade() -> None:
    # When the process of a running run last said it was alive (pggeolearn.runs.heartbeat).
    op.add_column("runs", sa.Column("heartbeat_at", sa.DateTime(timezone=True)), schema=S)
    # Runs stuck 'running' from before this revision cannot be told apart from live ones; only
    # one training run per model may stay running (the newest), the others were lost.
    op.execute(f"""
        UPDATE {S}.runs SET status = 'failed', finished_at = now(),
               error = 'lost: superseded by a later run of the same model (schema upgrade 0003)'
        WHERE kind = 'train' AND status = 'running' AND run_id NOT IN (
            SELECT max(run_id) FROM {S}.runs WHERE kind = 'train' AND status = 'running' GROUP BY model)""")
    # A model name is reserved by its running training run: a second `train --model X` is
    # refused at its start instead of failing at save.
    op.create_index("runs_one_training_per_model", "runs", ["model"], unique=True, schema=S,
                    postgresql_where=sa.text("kind = 'train' AND status = 'running'"))


def downgrade() -> None:
    op.drop_index("runs_one_training_per_model", table_name="runs", schema=S)
    op.drop_column("runs", "heartbeat_at", schema=S)
