"""The catalog tables of schema ``pggeolearn``, declared once (SQLAlchemy Core + GeoAlchemy2).

Migrations create exactly these tables (a test compares them with Alembic's autogenerate), and
code off the hot path may use them for typed queries. Hot paths use psycopg directly.
"""

from __future__ import annotations

from geoalchemy2 import Geometry, Raster
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from pggeolearn.db.schema import SCHEMA

metadata = MetaData(schema=SCHEMA)

datasets = Table(
    "datasets",
    metadata,
    Column("name", Text, primary_key=True),
    Column("srid", Integer, nullable=False),
    Column("resolution", Double, nullable=False),
    Column("tile_px", Integer, nullable=False),
    Column("overlap_px", Integer, nullable=False, server_default="0"),
    Column("minx", Double, nullable=False),
    Column("miny", Double, nullable=False),
    Column("maxx", Double, nullable=False),
    Column("maxy", Double, nullable=False),
    Column("image_sql", Text, nullable=False),
    Column("label_sql", Text, nullable=False),
    Column("classes", JSONB, nullable=False),
    Column("all_touched", Boolean, nullable=False, server_default="false"),
    Column("recipe", JSONB, nullable=False),
    Column("recipe_hash", Text, nullable=False),
    Column("stats", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # 0005: the version this row holds; an old version's row is named "NAME@N"
    Column("version", Integer, nullable=False),
    CheckConstraint("resolution > 0", name="datasets_resolution_positive"),
    CheckConstraint("tile_px BETWEEN 8 AND 4096", name="datasets_tile_px_range"),
    CheckConstraint("overlap_px >= 0 AND overlap_px < tile_px", name="datasets_overlap_range"),
    CheckConstraint("maxx > minx AND maxy > miny", name="datasets_extent_nonempty"),
)

chips = Table(
    "chips",
    metadata,
    Column("dataset", Text, ForeignKey(f"{SCHEMA}.datasets.name", ondelete="CASCADE"),
           primary_key=True),
    Column("tile_id", Integer, primary_key=True),
    Column("geom", Geometry("POLYGON", spatial_index=False), nullable=False),
    Column("image", Raster(spatial_index=False)),
    Column("label", Raster(spatial_index=False)),
    Column("split", Text),
    Column("nodata_frac", REAL),
    Column("class_counts", ARRAY(BigInteger)),
    Column("band_stats", ARRAY(Double)),  # per band [count, mean, std, min, max], NODATA out
    Column("recipe_hash", Text, nullable=False),
    Column("built_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("dataset_version", Integer),  # 0005: the dataset version the chip was built for
)
Index("chips_geom_idx", chips.c.geom, postgresql_using="gist")

models = Table(
    "models",
    metadata,
    Column("name", Text, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("recipe_hash", Text, nullable=False),
    Column("framework", Text, nullable=False),
    Column("architecture", JSONB, nullable=False),
    Column("hyperparameters", JSONB, nullable=False),
    Column("classes", JSONB, nullable=False),
    Column("normalization", JSONB, nullable=False),
    Column("tile_px", Integer, nullable=False),
    Column("resolution", Double, nullable=False),
    Column("srid", Integer, nullable=False),
    Column("bands", Integer, nullable=False),
    Column("weights", LargeBinary, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Column("best_epoch", Integer),
    Column("package_version", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("dataset_version", Integer),  # 0005: the version of `dataset` it was trained on
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", BigInteger, primary_key=True, autoincrement=True),
    Column("kind", Text, nullable=False),
    Column("model", Text),
    Column("dataset", Text),
    Column("params", JSONB, nullable=False, server_default="{}"),
    Column("extent", Geometry("POLYGON", spatial_index=False)),
    Column("status", Text, nullable=False, server_default="running"),
    Column("outputs", JSONB, nullable=False, server_default="{}"),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
    Column("checkpoint", LargeBinary),  # 0002: resumable state of a training run
    Column("heartbeat_at", DateTime(timezone=True)),  # 0003: the run's process was alive then
    Column("dataset_version", Integer),  # 0005: the version of the dataset it read (else the model's)
    Column("recipe_hash", Text),  # 0005: that version's recipe hash
    CheckConstraint("status IN ('running', 'done', 'failed')", name="runs_status_valid"),
)
# 0003: a running training run reserves its model name (pggeolearn.runs is written by runs.py only)
Index("runs_one_training_per_model", runs.c.model, unique=True,
      postgresql_where=text("kind = 'train' AND status = 'running'"))

watches = Table(
    "watches",
    metadata,
    Column("dataset", Text, ForeignKey(f"{SCHEMA}.datasets.name", ondelete="CASCADE"),
           primary_key=True),
    Column("source", Text, primary_key=True),  # "schema.table" the recipe reads
    Column("columns", ARRAY(Text), nullable=False),  # "g:<geometry column>" / "r:<raster column>"
    Column("margin_m", Double, nullable=False, server_default="0"),  # ground m around footprints
    Column("last_change", BigInteger, nullable=False, server_default="0"),  # refreshed up to
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

changes = Table(
    "changes",
    metadata,
    Column("change_id", BigInteger, primary_key=True, autoincrement=True),
    Column("source", Text, nullable=False),
    Column("geom", Geometry(spatial_index=False)),  # footprint in the source's SRID; NULL: all
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
Index("changes_source_idx", changes.c.source, changes.c.change_id)

chip_scores = Table(  # 0004: evaluate's per-chip scores, for sampling queries (hard examples)
    "chip_scores",
    metadata,
    Column("model", Text, nullable=False),
    Column("run_id", BigInteger, primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("tile_id", Integer, primary_key=True),
    Column("loss", REAL),  # mean cross-entropy over the chip's valid pixels
    Column("miou", REAL),
    Column("accuracy", REAL),
    Column("pixels", BigInteger, nullable=False),  # valid pixels scored
    Column("scored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
Index("chip_scores_model_idx", chip_scores.c.model, chip_scores.c.dataset, chip_scores.c.tile_id)

dataset_versions = Table(  # 0005: every recipe a dataset has had (kept after a drop: lineage)
    "dataset_versions",
    metadata,
    Column("dataset", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("recipe_hash", Text, nullable=False),
    Column("recipe", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("dropped_at", DateTime(timezone=True)),
    CheckConstraint("version >= 1", name="dataset_versions_version_positive"),
)

qgis_projects = Table(  # 0004: QGIS's own project table (Browser > PostgreSQL lists it)
    "qgis_projects",
    metadata,
    Column("name", Text, primary_key=True),
    Column("metadata", JSONB),
    Column("content", LargeBinary),
)
