"""Living datasets: pggeolearn.watches (which source tables a dataset follows),
pggeolearn.changes (footprints of rows changed in them, written by triggers), and
chips.band_stats (per-chip band statistics, so dataset statistics need not re-read images),
pggeolearn.chip_scores (each chip's loss and IoU per model and run: hard-example mining), and
pggeolearn.qgis_projects (QGIS's own project table: one styled project per dataset).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "pggeolearn"


def upgrade() -> None:
    op.create_table(
        "watches",
        sa.Column("dataset", sa.Text, sa.ForeignKey(f"{S}.datasets.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("source", sa.Text, primary_key=True),
        sa.Column("columns", sa.dialects.postgresql.ARRAY(sa.Text), nullable=False),
        sa.Column("margin_m", sa.Double, nullable=False, server_default="0"),
        sa.Column("last_change", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=S,
    )
    op.create_table(
        "changes",
        sa.Column("change_id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("geom", Geometry(spatial_index=False)),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=S,
    )
    op.create_index("changes_source_idx", "changes", ["source", "change_id"], schema=S)
    op.create_table(
        "chip_scores",
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("split", sa.Text, nullable=False),
        sa.Column("tile_id", sa.Integer, nullable=False),
        sa.Column("loss", sa.REAL),
        sa.Column("miou", sa.REAL),
        sa.Column("accuracy", sa.REAL),
        sa.Column("pixels", sa.BigInteger, nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("run_id", "tile_id"),
        schema=S,
    )
    op.create_index("chip_scores_model_idx", "chip_scores", ["model", "dataset", "tile_id"],
                    schema=S)
    # exactly as QgsPostgresUtils::createProjectsTable makes it (sql/qgis_projects_table.sql)
    op.create_table(
        "qgis_projects",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("metadata", sa.dialects.postgresql.JSONB),
        sa.Column("content", sa.LargeBinary),
        schema=S,
    )
    op.add_column("chips", sa.Column("band_stats", sa.dialects.postgresql.ARRAY(sa.Double)),
                  schema=S)
    # chips built before: per band [count, mean, stddev, min, max], NODATA excluded
    op.execute(f"""
        UPDATE {S}.chips AS c SET band_stats = (
            SELECT array_agg(ARRAY[st.count, st.mean, st.stddev, st.min, st.max]::float8[]
                             ORDER BY b)
            FROM generate_series(1, ST_NumBands(c.image)) AS b,
                 LATERAL ST_SummaryStats(c.image, b, true) AS st)
        WHERE c.image IS NOT NULL""")


def downgrade() -> None:
    op.drop_table("qgis_projects", schema=S)
    op.drop_table("chip_scores", schema=S)
    op.drop_column("chips", "band_stats", schema=S)
    op.drop_table("changes", schema=S)
    op.drop_table("watches", schema=S)
