"""Catalog tables (datasets, chips, models, runs) and the SQL functions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry, Raster
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "pggeolearn"
NOW = sa.text("now()")


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis_raster")
    op.create_table(
        "datasets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("srid", sa.Integer, nullable=False),
        sa.Column("resolution", sa.Double, nullable=False),
        sa.Column("tile_px", sa.Integer, nullable=False),
        sa.Column("overlap_px", sa.Integer, nullable=False, server_default="0"),
        sa.Column("minx", sa.Double, nullable=False),
        sa.Column("miny", sa.Double, nullable=False),
        sa.Column("maxx", sa.Double, nullable=False),
        sa.Column("maxy", sa.Double, nullable=False),
        sa.Column("image_sql", sa.Text, nullable=False),
        sa.Column("label_sql", sa.Text, nullable=False),
        sa.Column("classes", pg.JSONB, nullable=False),
        sa.Column("all_touched", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("recipe", pg.JSONB, nullable=False),
        sa.Column("recipe_hash", sa.Text, nullable=False),
        sa.Column("stats", pg.JSONB),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.CheckConstraint("resolution > 0", name="datasets_resolution_positive"),
        sa.CheckConstraint("tile_px BETWEEN 8 AND 4096", name="datasets_tile_px_range"),
        sa.CheckConstraint("overlap_px >= 0 AND overlap_px < tile_px", name="datasets_overlap_range"),
        sa.CheckConstraint("maxx > minx AND maxy > miny", name="datasets_extent_nonempty"),
        schema=S,
    )
    op.create_table(
        "chips",
        sa.Column("dataset", sa.Text, sa.ForeignKey(f"{S}.datasets.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("tile_id", sa.Integer, primary_key=True),
        sa.Column("geom", Geometry("POLYGON", spatial_index=False), nullable=False),
        sa.Column("image", Raster(spatial_index=False)),
        sa.Column("label", Raster(spatial_index=False)),
        sa.Column("split", sa.Text),
        sa.Column("nodata_frac", sa.REAL),
        sa.Column("class_counts", pg.ARRAY(sa.BigInteger)),
        sa.Column("recipe_hash", sa.Text, nullable=False),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )
    # Chips are written once and read every epoch (see README "Storage choices"): images out of
    # line and uncompressed (pglz cannot shrink imagery and writes 7-10x slower); labels
    # compress ~10x with lz4, which writes 6-10x faster than pglz (EXTERNAL where the server
    # lacks lz4).
    op.execute(f"ALTER TABLE {S}.chips ALTER COLUMN image SET STORAGE EXTERNAL")
    op.execute(f"""DO $$ BEGIN
        ALTER TABLE {S}.chips ALTER COLUMN label SET COMPRESSION lz4;
    EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
        ALTER TABLE {S}.chips ALTER COLUMN label SET STORAGE EXTERNAL;
    END $$""")
    op.create_index("chips_geom_idx", "chips", ["geom"], schema=S, postgresql_using="gist")
    op.create_table(
        "models",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("recipe_hash", sa.Text, nullable=False),
        sa.Column("framework", sa.Text, nullable=False),
        sa.Column("architecture", pg.JSONB, nullable=False),
        sa.Column("hyperparameters", pg.JSONB, nullable=False),
        sa.Column("classes", pg.JSONB, nullable=False),
        sa.Column("normalization", pg.JSONB, nullable=False),
        sa.Column("tile_px", sa.Integer, nullable=False),
        sa.Column("resolution", sa.Double, nullable=False),
        sa.Column("srid", sa.Integer, nullable=False),
        sa.Column("bands", sa.Integer, nullable=False),
        sa.Column("weights", sa.LargeBinary, nullable=False),
        sa.Column("metrics", pg.JSONB, nullable=False),
        sa.Column("best_epoch", sa.Integer),
        sa.Column("package_version", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("dataset", sa.Text),
        sa.Column("params", pg.JSONB, nullable=False, server_default="{}"),
        sa.Column("extent", Geometry("POLYGON", spatial_index=False)),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("outputs", pg.JSONB, nullable=False, server_default="{}"),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')", name="runs_status_valid"),
        schema=S,
    )


def downgrade() -> None:
    op.execute(f"DROP SCHEMA {S} CASCADE")
