"""Living datasets: follow the source tables a recipe reads, rebuild only the chips they change.

``watch(conn, dataset)`` finds the tables the dataset's image and label SQL read (PostgreSQL's
own planner says which: ``EXPLAIN (VERBOSE, FORMAT JSON)`` of the embedded recipe, views resolved to
their base tables) and puts change-tracking triggers on them (``sql/60_watch.sql``): every
insert, update, delete or truncate appends the footprints of the rows it touched, before and
after, to ``pggeolearn.changes``.

``refresh(dsn, dataset)`` rebuilds exactly the chips whose tiles those footprints touch since
the last refresh (``pggeolearn.watches.last_change``), each keeping its split, then updates the
statistics. Why triggers, not per-tile fingerprints or logical decoding: a fingerprint must
re-run the recipe's queries for every tile to notice a change (the cost of a rebuild), and
logical decoding needs ``wal_level = logical``, a replication slot that holds WAL while nobody
reads it, and superuser-level setup on a shared server. Statement-level triggers with
transition tables cost one ``INSERT ... SELECT`` per writing statement, need only ownership
of the watched tables, and record geometry, which is what decides which tiles change.

Buffered labels reach past their geometry: a road moved near a tile's edge changes the tile
next to it when its buffer does. ``margin_m`` (ground metres) widens every footprint; its
default is the largest ``buffer_m`` the label SQL gives over the extent when the dataset is
watched (0 for recipes without ``buffer_m``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pggeolearn import chips, datasets, errors
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect
from pggeolearn.db.errors import db_errors, first_line

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('pggeolearn changes', 0))"
_TRIGGERS = (("ins", "INSERT", "NEW TABLE AS pggeolearn_new"),
             ("upd", "UPDATE", "OLD TABLE AS pggeolearn_old NEW TABLE AS pggeolearn_new"),
             ("del", "DELETE", "OLD TABLE AS pggeolearn_old"))


@dataclass
class Source:
    """A table a recipe reads: ``schema.table`` and its geometry/raster columns."""

    schema: str
    table: str
    columns: list[str]  # "g:<geometry column>" / "r:<raster column>"

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL(".").join([sql.Identifier(self.schema), sql.Identifier(self.table)])


def sources(conn: psycopg.Connection, dataset: str) -> list[Source]:
    """The tables (outside schema pggeolearn) that the dataset's image and label SQL read, with
    geometry or raster columns (what a watch follows)."""
    out = []
    for schema, table in tables_read(conn, dataset):
        with db_errors(f"columns of {schema}.{table}"):
            cols = conn.execute(
                "SELECT CASE t.typname WHEN 'raster' THEN 'r:' ELSE 'g:' END || a.attname "
                "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass "
                "AND a.attnum > 0 AND NOT a.attisdropped "
                "AND t.typname IN ('geometry', 'geography', 'raster') ORDER BY a.attnum",
                [schema, table]).fetchall()
        if cols:
            out.append(Source(schema, table, [c[0] for c in cols]))
    return out


def tables_read(conn: psycopg.Connection, dataset: str) -> list[tuple[str, str]]:
    """``(schema, table)`` of every table outside schema pggeolearn that the dataset's image and
    label SQL read (views resolved to their tables), from the query plans, sorted."""
    ds = datasets.get(conn, dataset)
    r = ds.recipe
    tables: set[tuple[str, str]] = set()
    minx, miny, maxx, maxy = r.extent
    params = {"minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "srid": r.srid,
              "res": r.resolution}
    for kind, text in (("image", r.image_sql), ("label", r.label_sql)):
        query = usersql.embed(
            "WITH tile AS (SELECT 0::integer AS tile_id, "
            "ST_MakeEnvelope(%(minx)s, %(miny)s, %(maxx)s, %(maxy)s, %(srid)s) AS tile_geom, "
            "ST_MakeEmptyRaster(1, 1, %(minx)s, %(maxy)s, 1, -1, 0, 0, %(srid)s) AS tile_rast, "
            "%(srid)s::integer AS tile_srid, %(res)s::float8 AS tile_res) "
            "SELECT 1 FROM tile, LATERAL ({q}) AS q", q=text)
        try:
            with usersql.sandbox(conn, 30):
                tables |= usersql.tables_read(conn, query, params)
        except psycopg.Error as exc:
            raise errors.RecipeError(f"{kind} SQL of dataset {ds.name} cannot be planned: "
                                     f"{first_line(exc)}") from exc
    return sorted(t for t in tables if t[0] not in ("pggeolearn", "pg_catalog", "information_schema"))


def _check_margin(margin_m: float) -> None:
    if not 0 <= margin_m < 1e5:
        raise errors.ConfigError(f"margin must be 0..100000 ground metres, not {margin_m}")


def largest_buffer(conn: psycopg.Connection, dataset: str) -> float:
    """The largest ``buffer_m`` the label SQL gives anywhere in the extent (0 without one)."""
    ds = datasets.get(conn, dataset)
    if "buffer_m" not in ds.label_columns:
        return 0.0
    r = ds.recipe
    query = usersql.embed(
        "WITH tile AS (SELECT -1 AS tile_id, ST_MakeEnvelope(%(minx)s, %(miny)s, %(maxx)s, "
        "%(maxy)s, %(srid)s) AS tile_geom, NULL::raster AS tile_rast, %(srid)s::integer AS "
        "tile_srid, %(res)s::float8 AS tile_res) "
        "SELECT max(q.buffer_m::float8) FROM tile, LATERAL ({q}) AS q", q=r.label_sql)
    minx, miny, maxx, maxy = r.extent
    params = {"minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "srid": r.srid,
              "res": r.resolution}
    try:
        with usersql.sandbox(conn, 120):
            value = usersql.rows(conn, query, params, [("m", "float8")])[0][0]
    except psycopg.Error as exc:
        raise errors.RecipeError(f"label SQL of dataset {dataset} fails over its extent: "
                                 f"{first_line(exc)}") from exc
    return float(value) if value is not None and value == value and value > 0 else 0.0


def watch(conn: psycopg.Connection, dataset: str, *, margin_m: float | None = None
          ) -> tuple[list[Source], float]:
    """Install change tracking on every source table of ``dataset`` (idempotent). Returns the
    sources and the margin (ground metres; default: the label SQL's largest buffer)."""
    margin_m = largest_buffer(conn, dataset) if margin_m is None else float(margin_m)
    _check_margin(margin_m)
    found = sources(conn, dataset)
    if not found:
        raise errors.RecipeError(f"dataset {dataset}: its SQL reads no table with a geometry or "
                                 "raster column, so there is nothing to watch")
    with db_errors(f"dataset watch {dataset}"), conn.transaction():
        upto = _high_water(conn)
        for src in found:
            args = sql.SQL(", ").join(sql.Literal(c) for c in src.columns)
            for suffix, event, referencing in _TRIGGERS:
                name = sql.Identifier(f"pggeolearn_watch_{suffix}")
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, src.ident))
                conn.execute(sql.SQL(
                    "CREATE TRIGGER {} AFTER {} ON {} REFERENCING {} FOR EACH STATEMENT "
                    "EXECUTE FUNCTION pggeolearn.record_change({})").format(
                        name, sql.SQL(event), src.ident, sql.SQL(referencing), args))
            name = sql.Identifier("pggeolearn_watch_trunc")
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, src.ident))
            conn.execute(sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT "
                                 "EXECUTE FUNCTION pggeolearn.record_change()").format(
                                     name, src.ident))
            conn.execute(
                "INSERT INTO pggeolearn.watches (dataset, source, columns, margin_m, last_change) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (dataset, source) DO UPDATE "
                "SET columns = EXCLUDED.columns, margin_m = EXCLUDED.margin_m",
                [dataset, src.name, src.columns, margin_m, upto])
    return found, margin_m


def unwatch(conn: psycopg.Connection, dataset: str) -> list[str]:
    """Stop following the sources of ``dataset``; triggers go where no other dataset watches."""
    with db_errors(f"dataset unwatch {dataset}"), conn.transaction():
        gone = [r[0] for r in conn.execute(
            "DELETE FROM pggeolearn.watches WHERE dataset = %s RETURNING source", [dataset])]
        for source in gone:
            still = conn.execute("SELECT EXISTS (SELECT 1 FROM pggeolearn.watches "
                                 "WHERE source = %s)", [source]).fetchone()[0]
            if still or conn.execute("SELECT to_regclass(%s)", [source]).fetchone()[0] is None:
                continue
            for suffix in ("ins", "upd", "del", "trunc"):
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(f"pggeolearn_watch_{suffix}"), sql.SQL(source)))
        _prune(conn)
    return gone


def _high_water(conn: psycopg.Connection) -> int:
    """The last change id, after every writer in flight has committed (see sql/60_watch.sql)."""
    conn.execute(_LOCK)
    return conn.execute("SELECT coalesce(max(change_id), 0) FROM pggeolearn.changes").fetchone()[0]


def _prune(conn: psycopg.Connection) -> None:
    """Forget changes every watching dataset has refreshed past, and those nobody watches."""
    conn.execute(
        "DELETE FROM pggeolearn.changes c WHERE NOT EXISTS (SELECT 1 FROM pggeolearn.watches w "
        "WHERE w.source = c.source AND w.last_change < c.change_id)")


@dataclass
class RefreshReport:
    """What :func:`refresh` did; ``str()`` is what the CLI prints."""

    dataset: str
    changes: int = 0  # footprints recorded since the last refresh
    by_source: dict[str, int] = field(default_factory=dict)
    tiles: list[int] = field(default_factory=list)  # rebuilt
    changed: int = 0  # chips whose image or label bytes differ afterwards
    split_changes: dict[str, int] = field(default_factory=dict)  # "train->excluded": n
    margin_m: float = 0.0
    seconds: float = 0.0
    build: chips.BuildReport | None = None

    def __str__(self) -> str:
        if not self.changes:
            return f"chips {self.dataset}: no source changes since the last refresh"
        srcs = ", ".join(f"{n} in {s}" for s, n in sorted(self.by_source.items()))
        lines = [f"chips {self.dataset}: {self.changes} changed footprints ({srcs}); "
                 f"rebuilt {len(self.tiles)} chips touched (margin {self.margin_m:g} m), "
                 f"{self.changed} of them changed, in {self.seconds:.1f} s"]
        for move, n in sorted(self.split_changes.items()):
            lines.append(f"{n} chips {move} (became unusable: orphan or mostly NODATA)"
                         if move.endswith("excluded") else f"{n} chips {move}")
        usable = self.split_changes.get("excluded->usable", 0)
        if usable:
            lines.append(f"{usable} excluded chips are usable now; `pggeolearn chips split "
                         f"{self.dataset}` gives them a split (and may move others)")
        return "\n".join(lines)


def _usable(row: tuple) -> bool:
    """A chip (fingerprint row) with imagery and at most MAX_NODATA_FRAC NODATA."""
    return row[0] is not None and row[3] is not None and row[3] <= chips.MAX_NODATA_FRAC


def _fingerprints(conn: psycopg.Connection, dataset: str, tiles: list[int]) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in conn.execute(
        "SELECT tile_id, md5(ST_AsBinary(image)), md5(ST_AsBinary(label)), split, nodata_frac "
        "FROM pggeolearn.chips WHERE dataset = %s AND tile_id = ANY(%s)", [dataset, tiles])}


def refresh(dsn: str | None, dataset: str, *, margin_m: float | None = None, jobs: int = 1,
            progress: bool = True, statement_timeout_s: float = chips.DEFAULT_TIMEOUT_S
            ) -> RefreshReport:
    """Rebuild the chips of ``dataset`` whose tiles its watched sources changed since the last
    refresh; every chip keeps its split. See the module docstring."""
    started = time.perf_counter()
    report = RefreshReport(dataset)
    with connect(dsn, autocommit=True, application_name="pggeolearn chips refresh") as conn:
        ds = datasets.get(conn, dataset)
        dataset = ds.name  # "NAME@N" of the current version N is NAME
        with db_errors(f"chips refresh {dataset}"):
            watched = conn.execute("SELECT source, last_change FROM pggeolearn.watches "
                                   "WHERE dataset = %s", [dataset]).fetchall()
        if not watched:
            raise errors.ConfigError(f"dataset {dataset} is not watched: run `pggeolearn dataset "
                                     f"watch {dataset}` first (changes are recorded from then on)")
        since = min(w[1] for w in watched)
        with db_errors(f"chips refresh {dataset}"), conn.transaction():
            upto = _high_water(conn)
        if margin_m is None:
            with db_errors(f"chips refresh {dataset}"):
                margin_m = conn.execute("SELECT coalesce(max(margin_m), 0) FROM pggeolearn.watches"
                                        " WHERE dataset = %s", [dataset]).fetchone()[0]
        _check_margin(margin_m)
        report.margin_m = margin_m
        with db_errors(f"chips refresh {dataset}"):
            report.by_source = dict(conn.execute(
                "SELECT c.source, count(*) FROM pggeolearn.changes c JOIN pggeolearn.watches w "
                "ON w.source = c.source AND w.dataset = %s WHERE c.change_id > w.last_change "
                "AND c.change_id <= %s GROUP BY c.source", [dataset, upto]).fetchall())
            report.changes = sum(report.by_source.values())
            scale = conn.execute(
                "SELECT greatest(s[1], s[2]) FROM pggeolearn.ground_scale(ST_Centroid("
                "ST_MakeEnvelope(%s, %s, %s, %s, %s))) AS s", [*ds.recipe.extent, ds.recipe.srid]
            ).fetchone()[0]
            report.tiles = [r[0] for r in conn.execute(
                "SELECT tile_id FROM pggeolearn.changed_tiles(%s, %s, %s, %s)",
                [dataset, since, upto, margin_m * scale])]
            before = _fingerprints(conn, dataset, report.tiles)
        if report.tiles:
            report.build = chips.build(dsn or conn, dataset, tiles=report.tiles, force=True,
                                       keep_splits=True, jobs=jobs, progress=progress,
                                       statement_timeout_s=statement_timeout_s)
        with db_errors(f"chips refresh {dataset}"):
            after = _fingerprints(conn, dataset, report.tiles)
            for t in report.tiles:
                b, a = before.get(t), after.get(t)
                if b is None or a is None:
                    continue
                report.changed += b[:2] != a[:2]
                if b[2] != a[2]:
                    move = f"{b[2]}->{a[2]}"
                    report.split_changes[move] = report.split_changes.get(move, 0) + 1
                elif b[2] == "excluded" and _usable(a) and not _usable(b):
                    report.split_changes["excluded->usable"] = \
                        report.split_changes.get("excluded->usable", 0) + 1
            with conn.transaction():
                conn.execute("UPDATE pggeolearn.watches SET last_change = %s WHERE dataset = %s",
                             [upto, dataset])
                _prune(conn)
    report.seconds = time.perf_counter() - started
    return report
