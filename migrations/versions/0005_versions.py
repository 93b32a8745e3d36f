"""Dataset versions and lineage: pggeolearn.dataset_versions (every recipe a dataset has had,
kept after its version is dropped), datasets.version (the version a catalog row holds; an old
version's row is named ``NAME@N``), and the dataset version chips, models and runs were made
from (runs also record the recipe hash). Existing datasets become version 1 of their recipe.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "pggeolearn"


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("recipe_hash", sa.Text, nullable=False),
        sa.Column("recipe", pg.JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("dropped_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("version >= 1", name="dataset_versions_version_positive"),
        schema=S,
    )
    # every existing dataset is version 1 of its current recipe
    op.add_column("datasets", sa.Column("version", sa.Integer, nullable=False,
                                        server_default="1"), schema=S)
    op.alter_column("datasets", "version", server_default=None, schema=S)
    op.execute(f"""INSERT INTO {S}.dataset_versions (dataset, version, recipe_hash, recipe, created_at)
                   SELECT name, 1, recipe_hash, recipe, created_at FROM {S}.datasets""")
    op.add_column("chips", sa.Column("dataset_version", sa.Integer), schema=S)
    op.execute(f"UPDATE {S}.chips SET dataset_version = 1")
    op.add_column("models", sa.Column("dataset_version", sa.Integer), schema=S)
    # a model whose recipe is its dataset's current one was trained on version 1; others on a
    # recipe that is gone (their recipe_hash still says which)
    op.execute(f"""UPDATE {S}.models m SET dataset_version = 1 FROM {S}.datasets d
                   WHERE d.name = m.dataset AND d.recipe_hash = m.recipe_hash""")
    op.add_column("runs", sa.Column("dataset_version", sa.Integer), schema=S)
    op.add_column("runs", sa.Column("recipe_hash", sa.Text), schema=S)
    op.execute(f"""UPDATE {S}.runs r SET dataset_version = 1, recipe_hash = d.recipe_hash
                   FROM {S}.datasets d WHERE d.name = r.dataset""")
    op.execute(f"""UPDATE {S}.runs r SET dataset_version = m.dataset_version, recipe_hash = m.recipe_hash
                   FROM {S}.models m WHERE r.dataset IS NULL AND m.name = r.model""")

def downgrade() -> None:
    op.drop_column("runs", "recipe_hash", schema=S)
    op.drop_column("runs", "dataset_version", schema=S)
    op.drop_column("models", "dataset_version", schema=S)
    op.drop_column("chips", "dataset_version", schema=S)
    op.execute(f"DELETE FROM {S}.datasets WHERE position('@' in name) > 0")
    op.drop_column("datasets", "version", schema=S)
    op.drop_table("dataset_versions", schema=S)
