"""The chip store: every tile of a dataset materialized once, the source every epoch reads.

Building (:func:`build`, ``pggeolearn chips build``)
    One row per grid tile in ``pggeolearn.chips``: ``geom`` (tile envelope), ``image``
    (``pggeolearn.image_tile``), ``label`` (``pggeolearn.label_tile``), ``nodata_frac``,
    ``class_counts``, ``recipe_hash``, ``built_at``; then splits and statistics.

    * **Read-only recipes.** The recipe's SQL (inside image_tile/label_tile) only ever runs in
      READ ONLY transactions. Each worker connection creates a temporary staging table first;
      per batch of tiles it runs ``INSERT INTO pg_temp.<stage> SELECT image_tile(), label_tile()``
      in a READ ONLY transaction (PostgreSQL allows writes to temporary tables there and
      nowhere else), checks that the stage holds exactly the batch's tiles, and moves the rows
      into ``pggeolearn.chips`` (``ON CONFLICT DO UPDATE``) in a separate read-write
      transaction that runs only our SQL (``search_path`` pinned to ``pg_catalog, pg_temp``).
    * **Set-based, parallel.** Batches of up to 32 tiles; ``jobs`` connections (one thread
      each: psycopg releases the GIL while the server works) take batches from one queue.
      The first tile is built alone before anything else, so a broken recipe fails with a
      clear error before any chip is written.
    * **Restartable.** A tile whose chip exists with the dataset's current ``recipe_hash`` is
      skipped; a chip with another hash is *stale* and rebuilt (``rebuild_stale``); chips
      outside the grid are removed. A killed build keeps every committed batch (whole chips,
      never half a row) and a rerun finishes the rest: exactly one chip per tile. One build
      per dataset at a time (an advisory lock).
    * **Errors.** Recipe SQL failing (a missing table, a write attempt, a bad value) ->
      :class:`~pggeolearn.errors.RecipeError` naming the tile and which SQL; more than
      ``statement_timeout_s`` per tile -> ``QueryTimeout``; a dropped connection ->
      ``ConnectionLost``; a full disk -> ``DiskFull``. The failing batch writes nothing.

    **Exclusion rule.** A chip whose ``image`` is NULL (*orphan*: no imagery reaches the tile)
    or whose ``nodata_frac`` is above 0.5 gets split ``'excluded'`` and is never streamed for
    training. Orphans are tiles for which image_tile returns NULL or its all-NODATA placeholder
    (every band flagged "is nodata"); they are stored with NULL image, label and class_counts.
    Imagery that is there but NODATA everywhere (``nodata_frac`` = 1) counts as *empty*.
    ``nodata_frac`` is the largest fraction of NODATA pixels over the bands that declare a
    NODATA value (1 for orphans). ``class_counts[k]`` (Python, 0-based; ``[k + 1]`` in SQL)
    is the number of label pixels of class ``k`` where the image has data
    (``pggeolearn.valid_label``: NODATA pixels are no class), for k = 0 .. the largest class id.

Splits: :func:`assign_splits` and :func:`leakage` (see :mod:`pggeolearn.splits`), run with the
stored parameters (else the defaults) at the end of every build.

Statistics, stored in ``pggeolearn.datasets.stats`` (jsonb) by :func:`refresh_stats` after a
build or a re-split; the loader normalizes with them and a trained model carries them::

    {
      "version": 1,
      "recipe_hash": "038d751f8d53528d",     # the recipe the chips were built with
      "computed_at": "2026-11-22T10:00:00+00:00",
      "chips": 192,                          # rows in the store for this dataset
      "tiles": 192,                          # tiles in the grid
      "bands": [{"band": 1, "count": n, "mean": m, "std": s, "min": a, "max": b}, ...],
                                             # TRAIN chips only, NODATA excluded, std population
      "class_pixels": {"0": n, "1": n},      # TRAIN label pixels per class id
      "class_freq": {"0": 0.93, "1": 0.07},  # the same as fractions
      "classes": {"1": "road"},
      "splits": {"train": n, "val": n, "test": n, "excluded": n, "unassigned": n},
      "orphans": n,                          # image NULL (no imagery)
      "empties": n,                          # all pixels NODATA
      "nodata_excluded": n,                  # orphans + more than 50 % NODATA
      "guard_excluded": n,                   # excluded by the guard band between splits
      "background_only": n,                  # chips without any labelled pixel
      "stale": n,                            # chips of another recipe_hash
      "leakage": 0,                          # chips.leakage() with the split's guard
      "split_params": {"block_m": null, "ratios": [0.7, 0.15, 0.15], "seed": 0,
                       "guard_m": null, "stratify": false,   # as asked (null: default)
                       "block_m_effective": 120.0, "guard_m_effective": 33.7,
                       "blocks": {"train": 13, ...}, "seed_used": "0", "attempts": 1,
                       "swaps": 0, "missing_classes": {}}
    }
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from tqdm import tqdm

from pggeolearn import datasets, errors, palette, splits
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect, dsn_of, pool
from pggeolearn.db.errors import db_errors, first_line, translate
from pggeolearn.resources import sql_text
from pggeolearn.splits import (
    EXCLUDED,
    MAX_NODATA_FRAC,
    SPLITS,
    SplitParams,
    SplitReport,
    leakage,
)

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = [
    "BuildReport", "MapView", "SplitReport", "assign_splits", "build", "leakage", "map_view",
    "refresh_stats", "show", "summary",
]

DEFAULT_TIMEOUT_S = 60.0  # per tile
MAX_BATCH = 32
STATS_VERSION = 1
_INFRA_SQLSTATE = ("08", "53", "57", "58", "XX")  # connection, resources, cancel/shutdown, system
_STAGE = "pg_temp.pggeolearn_chip_stage"


@dataclass
class BuildReport:
    """What :func:`build` did; ``str()`` is what the CLI prints."""

    dataset: str
    recipe_hash: str
    tiles: int  # in the grid
    selected: int  # after --where
    built: int = 0  # written by this run (new + stale rebuilt + forced)
    skipped: int = 0  # already current
    stale_rebuilt: int = 0
    stale_left: int = 0
    removed: int = 0  # chips outside the grid, deleted
    seconds: float = 0.0  # the whole call
    build_seconds: float = 0.0  # materializing chips only (what tiles/s is computed from)
    jobs: int = 1
    batches: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    splits: SplitReport | None = None

    @property
    def rate(self) -> float:
        """Chips materialized per second (splits and statistics not counted)."""
        return self.built / self.build_seconds if self.build_seconds > 0 else 0.0

    def __str__(self) -> str:
        s = self.stats
        lines = [
            f"chips {self.dataset}: built {self.built} of {self.selected} selected tiles "
            f"({self.skipped} already current, {self.stale_rebuilt} stale rebuilt) in "
            f"{self.build_seconds:.1f} s, {self.rate:.1f} tiles/s with {self.jobs} job(s); "
            f"{self.seconds:.1f} s in all",
        ]
        if self.removed:
            lines.append(f"removed {self.removed} chips outside the grid")
        if self.stale_left:
            lines.append(f"{self.stale_left} stale chips kept (rebuild_stale is off)")
        if s:
            lines.append(
                f"store: {s['chips']} of {s['tiles']} tiles; {s['orphans']} orphans (no imagery), "
                f"{s['empties']} empties (all NODATA), {s['nodata_excluded']} excluded for NODATA")
        if self.splits is not None:
            lines.append(str(self.splits))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# build


def _stage_failure(exc: psycopg.Error) -> bool:
    """True when an error in the staging step is the recipe's doing (not the server's)."""
    state = getattr(exc, "sqlstate", None)
    return state is not None and state[:2] not in _INFRA_SQLSTATE


class _Worker:
    """One connection of the build's pool building batches of tiles through its own staging
    table (see :func:`_open_workers`)."""

    def __init__(self, conn: psycopg.Connection, ds: datasets.Dataset, timeout_s: float, index: int,
                 keep_splits: bool = False):
        self.ds = ds
        self.timeout_s = timeout_s
        self.conn = conn
        with db_errors(f"chips build {ds.name}: worker setup"):
            conn.execute("SELECT set_config('application_name', %s, false)", [f"pggeolearn chips build {index}"])
        self.base = {"dataset": ds.name, "recipe_hash": ds.recipe_hash, "dataset_version": ds.version,
                     "max_class": max(ds.recipe.classes), "keep_split": keep_splits,
                     "max_nodata": MAX_NODATA_FRAC}

    def close(self) -> None:
        self.conn.close()

    def cancel(self) -> None:
        try:
            self.conn.cancel_safe(timeout=2)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def run(self, tiles: list[int]) -> None:
        params = self.base | {"tile_ids": tiles}
        what = f"tile {tiles[0]}" if len(tiles) == 1 else f"tiles {tiles[0]}..{tiles[-1]}"
        try:
            with usersql.sandbox(self.conn, self.timeout_s * len(tiles)):
                self.conn.execute(sql_text("chips_stage"), params)
        except psycopg.Error as exc:
            raise self._stage_error(exc, tiles, what) from exc
        with db_errors(f"chips build {self.ds.name}: storing {what}"), self.conn.transaction():
            self.conn.execute("SELECT set_config('search_path', 'pg_catalog, pg_temp', true)")
            if not self.conn.execute(sql_text("chips_stage_check"), params).fetchone()[0]:
                raise errors.RecipeError(
                    f"chips build {self.ds.name}: the staging table of {what} holds rows the build "
                    "did not write (does the recipe SQL write into temporary tables?)")
            self.conn.execute(sql_text("chips_move"), params)
            self.conn.execute(f"TRUNCATE {_STAGE}")

    def _stage_error(self, exc: psycopg.Error, tiles: list[int], what: str) -> errors.PggeolearnError:
        context = f"chips build {self.ds.name}: {what}"
        if not _stage_failure(exc):
            err = translate(exc, context)
            if isinstance(err, errors.QueryTimeout):
                return errors.QueryTimeout(f"{err} (limit {self.timeout_s:g} s per tile; raise "
                                           "statement_timeout_s / --statement-timeout)")
            return err
        found = self._diagnose(tiles)
        tile, kind, cause = found or (tiles[0] if len(tiles) == 1 else None, "recipe", exc)
        where = f"tile {tile}" if tile is not None else what
        msg = (f"{kind} SQL of dataset {self.ds.name} fails on {where}: "
               f"{usersql.permission_hint(cause) or first_line(cause)}")
        if getattr(cause, "sqlstate", None) == "25006":
            msg += " (recipe SQL runs in READ ONLY transactions and may not write)"
        return errors.RecipeError(msg)

    def _diagnose(self, tiles: list[int]) -> tuple[int, str, psycopg.Error] | None:
        """The first tile and function of a failed batch that fails on its own."""
        for tile in tiles:
            for kind, fn in (("image", "image_tile"), ("label", "label_tile")):
                try:
                    with usersql.sandbox(self.conn, self.timeout_s):
                        self.conn.execute(sql.SQL("SELECT pggeolearn.{}(%s, %s) IS NULL").format(
                            sql.Identifier(fn)), [self.ds.name, tile])
                except psycopg.Error as exc:
                    if not _stage_failure(exc):
                        return None
                    return tile, kind, exc
        return None


def _select_tiles(dsn: str, ds: datasets.Dataset, where: str | None) -> list[int]:
    """Tile ids to build: all, or those the --where SQL over (tile_id, geom) keeps."""
    if where is None:
        return list(range(ds.n_tiles))
    if not usersql.stored(where):
        raise errors.ConfigError("--where is empty")
    query = usersql.embed(
        "SELECT t.tile_id FROM (SELECT g.tile_id, g.geom FROM pggeolearn.tile_grid(%(dataset)s) AS g)"
        " AS t WHERE ({user}) ORDER BY t.tile_id", user=where)
    # its own short-lived connection: user SQL never runs on the one that writes
    with connect(dsn, autocommit=True, application_name="pggeolearn chips where") as conn:
        try:
            with usersql.sandbox(conn):
                return [r[0] for r in usersql.rows(conn, query, {"dataset": ds.name},
                                                   [("tile_id", "integer")])]
        except psycopg.Error as exc:
            if not _stage_failure(exc):
                raise translate(exc, "--where") from exc
            raise errors.ConfigError(f"--where fails: {first_line(exc)}") from exc


def _batches(tiles: list[int], jobs: int, batch_size: int | None) -> list[list[int]]:
    """Cut ``tiles`` into batches: ``batch_size`` each when given, else "guided" sizes that
    start at up to MAX_BATCH and shrink towards the end (a quarter of each job's share of what
    is left, at least 2), so that the jobs finish together and progress stays smooth."""
    if batch_size is not None:
        return [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    out, i = [], 0
    while i < len(tiles):
        size = max(2, min(MAX_BATCH, math.ceil((len(tiles) - i) / (jobs * 4))))
        out.append(tiles[i:i + size])
        i += size
    return out


def build(conn_or_dsn: psycopg.Connection | str | None, dataset: str, *, jobs: int = 1,
          where: str | None = None, progress: bool = True, rebuild_stale: bool = True,
          force: bool = False, batch_size: int | None = None,
          statement_timeout_s: float = DEFAULT_TIMEOUT_S, tiles: list[int] | None = None,
          keep_splits: bool = False) -> BuildReport:
    """Materialize the chips of ``dataset``, then assign splits and compute statistics.

    ``conn_or_dsn`` only says which database: the build opens its own connections (a given
    connection's uncommitted work is not seen). ``jobs`` parallel connections; ``where`` is SQL
    over the tile grid's ``tile_id`` and ``geom`` (grid CRS) selecting tiles; ``force``
    rebuilds selected chips even when current; ``statement_timeout_s`` bounds each tile.
    ``tiles`` selects tile ids directly (instead of ``where``); ``keep_splits`` keeps every
    rebuilt chip's split (a chip that becomes unusable is excluded) and recomputes statistics
    without re-splitting, as ``chips refresh`` does.
    See the module docstring for the rules (read-only recipes, resume, exclusion).
    """
    if not isinstance(jobs, int) or not 1 <= jobs <= 64:
        raise errors.ConfigError(f"jobs must be 1..64, not {jobs!r}")
    if not statement_timeout_s or statement_timeout_s <= 0:
        raise errors.ConfigError("statement timeout must be > 0 seconds")
    if batch_size is not None and not 1 <= batch_size <= 1024:
        raise errors.ConfigError(f"batch size must be 1..1024, not {batch_size}")
    dsn = dsn_of(conn_or_dsn) if isinstance(conn_or_dsn, psycopg.Connection) else conn_or_dsn
    started = time.perf_counter()
    with connect(dsn, autocommit=True, application_name="pggeolearn chips build") as control:
        ds = datasets.get(control, dataset)
        dataset = ds.name  # "NAME@N" of the current version N is NAME
        with db_errors("chips build lock"):
            locked = control.execute(
                "SELECT pg_try_advisory_lock(hashtextextended('pggeolearn chips ' || %s, 0))",
                [dataset]).fetchone()[0]
        if not locked:
            raise errors.DatabaseError(f"another chips build of {dataset} is running")
        selected = (sorted({int(t) for t in tiles if 0 <= int(t) < ds.n_tiles})
                    if tiles is not None else _select_tiles(dsn, ds, where))
        report = BuildReport(dataset, ds.recipe_hash, ds.n_tiles, len(selected), jobs=jobs)
        with db_errors(f"chips build {dataset}"):
            existing = dict(control.execute(
                "SELECT tile_id, recipe_hash = %s FROM pggeolearn.chips WHERE dataset = %s",
                [ds.recipe_hash, dataset]).fetchall())
            if rebuild_stale:
                report.removed = control.execute(
                    "DELETE FROM pggeolearn.chips WHERE dataset = %s AND "
                    "(tile_id < 0 OR tile_id >= %s)", [dataset, ds.n_tiles]).rowcount
        todo: list[int] = []
        for t in selected:
            current = existing.get(t)
            if current is None or force:
                todo.append(t)
            elif not current:
                if rebuild_stale:
                    todo.append(t)
                    report.stale_rebuilt += 1
                else:
                    report.stale_left += 1
            else:
                report.skipped += 1
        t0 = time.perf_counter()
        report.batches = _run(dsn, ds, todo, jobs, batch_size, statement_timeout_s, progress,
                              keep_splits)
        report.build_seconds = time.perf_counter() - t0
        report.built = len(todo)

        with db_errors(f"chips build {dataset}"):
            has_chips = control.execute("SELECT EXISTS (SELECT 1 FROM pggeolearn.chips "
                                        "WHERE dataset = %s)", [dataset]).fetchone()[0]
        if has_chips and keep_splits:
            refresh_stats(control, dataset, splits_kept=True)
            report.stats = datasets.get(control, dataset).stats or {}
        elif has_chips:
            params = SplitParams.from_json((ds.stats or {}).get("split_params"))
            report.splits = assign_splits(
                control, dataset, block_m=params.block_m, ratios=params.ratios, seed=params.seed,
                guard_m=params.guard_m, stratify=params.stratify)
            report.stats = datasets.get(control, dataset).stats or {}
        with db_errors(f"chips build {dataset}"):
            control.execute("SELECT pg_advisory_unlock(hashtextextended('pggeolearn chips ' || %s, 0))",
                            [dataset])
    report.seconds = time.perf_counter() - started
    return report


def _run(dsn: str, ds: datasets.Dataset, todo: list[int], jobs: int, batch_size: int | None,
         timeout_s: float, progress: bool, keep_splits: bool = False) -> int:
    """Build ``todo`` tiles: the first alone (a recipe check), the rest in batches from a queue.
    Returns the number of batches."""
    if not todo:
        return 0
    workers: list[_Worker] = []
    handle: ConnectionPool | None = None
    bar = tqdm(total=len(todo), unit="tile", desc=f"chips {ds.name}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        planned = _batches(todo[1:], jobs, batch_size)
        batches: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        for b in planned:
            batches.put(b)
        n = max(1, min(jobs, len(planned)))
        handle, workers = _open_workers(dsn, ds, timeout_s, n, keep_splits)
        workers[0].run(todo[:1])
        advance(1)
        if n == 1:
            _drain(workers[0], batches, threading.Event(), advance)
            return len(planned) + 1
        stop = threading.Event()
        failures: list[BaseException] = []

        def work(w: _Worker) -> None:
            try:
                _drain(w, batches, stop, advance)
            except BaseException as exc:
                with lock:
                    failures.append(exc)
                stop.set()

        with cf.ThreadPoolExecutor(n, thread_name_prefix="pggeolearn-chips") as executor:
            futures = [executor.submit(work, w) for w in workers]
            try:
                while cf.wait(futures, timeout=0.2).not_done:
                    pass
            except KeyboardInterrupt:
                stop.set()
                for w in workers:
                    w.cancel()
                raise
        if failures:
            raise failures[0]
        return len(planned) + 1
    finally:
        for w in workers:
            w.close()
        if handle is not None:
            handle.close()
        bar.close()


def _stage_setup(conn: psycopg.Connection) -> None:
    """A worker connection's session: no wait for the WAL flush (chips can always be rebuilt),
    its staging table, PostGIS loaded (~0.1 s CPU per backend)."""
    conn.execute("SET synchronous_commit TO off")
    conn.execute(sql_text("chips_stage_table"))


def _open_workers(dsn: str, ds: datasets.Dataset, timeout_s: float, n: int,
                  keep_splits: bool = False) -> tuple[ConnectionPool, list[_Worker]]:
    """A pool of ``n`` connections, opened and set up side by side (all or none), and a worker
    on each; close the workers, then the pool."""
    handle = pool(dsn, n, application_name="pggeolearn chips build", configure=_stage_setup)
    workers: list[_Worker] = []
    try:
        for i in range(n):
            workers.append(_Worker(handle.getconn(), ds, timeout_s, i, keep_splits))
    except BaseException:
        for w in workers:
            w.close()
        handle.close()
        raise
    return handle, workers


def _drain(w: _Worker, batches: queue.SimpleQueue, stop: threading.Event, advance) -> None:
    while not stop.is_set():
        try:
            tiles = batches.get_nowait()
        except queue.Empty:
            return
        w.run(tiles)
        advance(len(tiles))


# ------------------------------------------------------------------------------------------
# statistics


def _finite(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def assign_splits(conn: psycopg.Connection, dataset: str, **params: Any) -> SplitReport:
    """Spatial splits (:func:`pggeolearn.splits.assign_splits`, same parameters) and the
    statistics they decide, stored in one transaction."""
    with conn.transaction():
        report = splits.assign_splits(conn, dataset, **params)
        refresh_stats(conn, dataset, split_report=report)
    return report


def combine_band_stats(rows: list[list[list[float | None]]], nbands: int) -> list[dict[str, Any]]:
    """Dataset band statistics from per-chip ``[count, mean, std, min, max]`` rows (in tile
    order, so the result is reproducible): counts add, means weight, variances combine with
    Chan et al.'s pairwise formula (no sum of squares, no cancellation)."""
    n = np.zeros(nbands)
    mean = np.zeros(nbands)
    m2 = np.zeros(nbands)
    lo = np.full(nbands, np.inf)
    hi = np.full(nbands, -np.inf)
    for chip in rows:
        for b, (cnt, m, sd, mn, mx) in enumerate(chip[:nbands]):
            if not cnt:
                continue
            total = n[b] + cnt
            delta = m - mean[b]
            mean[b] += delta * cnt / total
            m2[b] += sd * sd * cnt + delta * delta * n[b] * cnt / total
            n[b] = total
            lo[b], hi[b] = min(lo[b], mn), max(hi[b], mx)
    return [{"band": b + 1, "count": int(n[b]),
             "mean": _finite(mean[b]) if n[b] else None,
             "std": _finite(math.sqrt(m2[b] / n[b])) if n[b] else None,
             "min": _finite(lo[b]) if n[b] else None,
             "max": _finite(hi[b]) if n[b] else None} for b in range(nbands)]


def refresh_stats(conn: psycopg.Connection, dataset: str, *,
                  split_report: SplitReport | None = None,
                  splits_kept: bool = False) -> dict[str, Any]:
    """Compute the dataset's statistics (layout in the module docstring) and store them.
    ``splits_kept``: no chip moved between train/val/test since the last computation (a
    refresh only excludes chips), so the stored leakage still holds."""
    ds = datasets.get(conn, dataset)
    dataset = ds.name  # "NAME@N" of the current version N is NAME
    old = ds.stats or {}
    base = {"dataset": dataset, "recipe_hash": ds.recipe_hash, "max_nodata": MAX_NODATA_FRAC}
    with db_errors(f"statistics of {dataset}"):
        cur = conn.execute(sql_text("chips_counts"), base)
        counts = dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))
        nbands = counts["nbands"] or 0
        rows = [r[0] for r in conn.execute(sql_text("chips_band_stats"), base)]
        bands = combine_band_stats(rows, nbands) if nbands else []
        pixels = {str(k): int(n) for k, n in conn.execute(sql_text("chips_class_pixels"), base)}
    for cid in [0, *ds.recipe.classes]:
        pixels.setdefault(str(cid), 0)
    pixels = dict(sorted(pixels.items(), key=lambda kv: int(kv[0])))
    total = sum(pixels.values())
    if split_report is not None:
        split_params = split_report.to_json()
        guard_excluded = split_report.guard_excluded
        leak = split_report.leakage
    else:
        split_params = old.get("split_params")
        guard_excluded = old.get("guard_excluded", 0)
        leak = (old.get("leakage") if splits_kept else leakage(conn, dataset)) \
            if split_params else None
    stats = {
        "version": STATS_VERSION,
        "recipe_hash": ds.recipe_hash,
        "computed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "built_at": counts["built_at"].isoformat(timespec="seconds") if counts["built_at"] else None,
        "chips": counts["chips"],
        "tiles": ds.n_tiles,
        "bands": bands,
        "class_pixels": pixels,
        "class_freq": {k: (v / total if total else 0.0) for k, v in pixels.items()},
        "classes": {str(k): v for k, v in ds.recipe.classes.items()},
        "splits": {name: counts[name] for name in (*SPLITS, EXCLUDED, "unassigned")},
        "orphans": counts["orphans"],
        "empties": counts["empties"],
        "nodata_excluded": counts["orphans"] + counts["mostly_nodata"],
        "guard_excluded": guard_excluded,
        "background_only": counts["background_only"],
        "stale": counts["stale"],
        "leakage": leak,
        "split_params": split_params,
    }
    with db_errors(f"statistics of {dataset}"), conn.transaction():
        conn.execute("UPDATE pggeolearn.datasets SET stats = %s WHERE name = %s",
                     [Jsonb(stats), dataset])
    return stats


def summary(conn: psycopg.Connection, dataset: str) -> str:
    """The stored chip statistics of ``dataset`` as a printable block (for ``dataset show``)."""
    ds = datasets.get(conn, dataset)
    s = ds.stats
    if not s:
        return f"chips: none built yet (run: pggeolearn chips build {dataset})"
    sp = s.get("splits", {})
    state = "current" if s.get("recipe_hash") == ds.recipe_hash else \
        f"recipe changed since ({s.get('recipe_hash')}): rebuild"
    lines = [
        f"chips: {s['chips']} of {s['tiles']} tiles, built {s.get('built_at') or '-'} ({state}); "
        f"train {sp.get('train', 0)}, val {sp.get('val', 0)}, test {sp.get('test', 0)}, "
        f"excluded {sp.get('excluded', 0)}"
        + (f", unassigned {sp['unassigned']}" if sp.get("unassigned") else ""),
        f"excluded: {s['nodata_excluded']} without imagery or > {MAX_NODATA_FRAC:.0%} NODATA "
        f"({s['orphans']} orphans, {s['empties']} empties), {s['guard_excluded']} in guard bands; "
        f"{s['background_only']} chips have no labelled pixel"
        + (f"; {s['stale']} stale chips" if s.get("stale") else ""),
    ]
    p = s.get("split_params")
    if p:
        b = p.get("blocks", {})
        block = p.get("block_m_effective") or p.get("block_m") or 0
        lines.append(
            f"splits: blocks of {block:g} m (train {b.get('train', 0)}, val {b.get('val', 0)}, "
            f"test {b.get('test', 0)}), ratios {','.join(f'{r:g}' for r in p['ratios'])}, seed "
            f"{p['seed']}, guard {p.get('guard_m_effective', 0):.1f} m"
            + (", stratified" if p.get("stratify") else "")
            + f"; leakage {s.get('leakage')}")
        for name, miss in (p.get("missing_classes") or {}).items():
            lines.append(f"  {name} has no pixels of class(es) {', '.join(map(str, miss))}")
    if s.get("bands"):
        lines.append("bands (train chips, NODATA excluded):")
        lines.append(f"  {'band':>4} {'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'pixels':>12}")
        for b in s["bands"]:
            lines.append(f"  {b['band']:>4} {_num(b['mean'])} {_num(b['std'])} {_num(b['min'])} "
                         f"{_num(b['max'])} {b['count']:>12}")
    names = {"0": "background", **s.get("classes", {})}
    lines.append("classes (train pixels):")
    for k, n in s.get("class_pixels", {}).items():
        freq = s.get("class_freq", {}).get(k, 0.0)
        lines.append(f"  {k:>4} {names.get(k, '(undeclared)'):<16} {n:>12} {freq:>8.2%}")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.3f}"


# ------------------------------------------------------------------------------------------
# looking at chips: a PNG contact sheet and a QGIS view

SPLIT_RGB = palette.SPLIT_RGB  # the colours of QGIS's chip footprints too


def _display_rgb(image: bytes | None, size: int) -> np.ndarray:
    """A chip's image as uint8 (h, w, 3) for display; grey when there is no imagery."""
    from pggeolearn import wkb

    if image is None:
        return np.full((size, size, 3), 96, np.uint8)
    tile = wkb.decode(image)
    data = tile.data[:3] if tile.bands >= 3 else tile.data[:1].repeat(3, axis=0)
    valid = np.ones(data.shape[1:], bool)
    for b in range(min(tile.bands, 3)):
        if tile.nodata[b] is not None:
            valid &= tile.band(b) != tile.nodata[b]
    if data.dtype == np.uint8:
        rgb = np.array(data, dtype=np.uint8)
    else:
        vals = data[:, valid].astype(np.float64)
        lo, hi = (np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0))
        rgb = np.clip((data.astype(np.float64) - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    rgb = np.moveaxis(rgb, 0, -1).copy()
    rgb[~valid] = 0
    return rgb


def show(conn: psycopg.Connection, dataset: str, out: str | Path, *, n: int = 16,
         split: str | None = None, seed: int = 0) -> Path:
    """Write a PNG grid of ``n`` sample chips: image, translucent label overlay coloured per
    class, border coloured by split (train green, val blue, test orange, excluded dark grey)."""
    from PIL import Image, ImageDraw

    if not 1 <= n <= 1024:
        raise errors.ConfigError(f"--n must be 1..1024, not {n}")
    if split is not None and split not in (*SPLITS, EXCLUDED):
        raise errors.ConfigError(f"unknown split {split!r} (train, val, test, excluded)")
    ds = datasets.get(conn, dataset)
    dataset = ds.name  # "NAME@N" of the current version N is NAME
    with db_errors(f"chips of {dataset}"):
        rows = conn.execute(sql_text("chips_sample"),
                            {"dataset": dataset, "split": split, "seed": seed, "n": n},
                            binary=True).fetchall()
    if not rows:
        what = f" in split {split}" if split else ""
        raise errors.NotBuilt(f"dataset {dataset} has no chips{what} (run: pggeolearn chips build {dataset})")
    from pggeolearn import wkb

    cell = min(ds.recipe.tile_px, 256)
    pad, caption = 4, 14
    cols = math.ceil(math.sqrt(len(rows)))
    nrows = math.ceil(len(rows) / cols)
    legend = 18
    sheet = Image.new("RGB", (cols * (cell + 2 * pad), nrows * (cell + 2 * pad + caption) + legend),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    overlay = np.zeros((256, 4), np.uint8)
    for cid in range(1, 256):
        overlay[cid, :3] = palette.class_colour(cid)
        overlay[cid, 3] = 110
    for i, (tile_id, chip_split, image, label, _nodata_frac) in enumerate(rows):
        rgb = _display_rgb(image, ds.recipe.tile_px)
        base = Image.fromarray(rgb).convert("RGBA")
        if label is not None:
            lab = np.asarray(wkb.decode(label).band(0))
            base = Image.alpha_composite(base, Image.fromarray(overlay[lab], "RGBA"))
        thumb = base.convert("RGB").resize((cell, cell), Image.NEAREST)
        x = (i % cols) * (cell + 2 * pad)
        y = (i // cols) * (cell + 2 * pad + caption)
        draw.rectangle([x, y, x + cell + 2 * pad - 1, y + cell + 2 * pad - 1],
                       fill=SPLIT_RGB.get(chip_split, SPLIT_RGB[None]))
        sheet.paste(thumb, (x + pad, y + pad))
        text = f"{tile_id} {chip_split or '-'}" + (" no imagery" if image is None else "")
        draw.text((x + pad, y + cell + 2 * pad), text, fill=(0, 0, 0))
    x = 4
    ly = sheet.height - legend + 3
    for name in (*SPLITS, EXCLUDED):
        draw.rectangle([x, ly, x + 10, ly + 10], fill=SPLIT_RGB[name])
        draw.text((x + 14, ly), name, fill=(0, 0, 0))
        x += 18 + 7 * len(name)
    for cid, name in ds.recipe.classes.items():
        draw.rectangle([x, ly, x + 10, ly + 10], fill=palette.class_colour(cid))
        draw.text((x + 14, ly), f"{cid} {name}", fill=(0, 0, 0))
        x += 32 + 7 * len(name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


@dataclass
class MapView:
    """The view :func:`map_view` made; ``describe()`` says how to open it in QGIS."""

    schema: str
    name: str
    chips: int
    srid: int
    columns: list[str]
    conninfo: dict[str, Any]

    def describe(self) -> str:
        c = self.conninfo
        return "\n".join([
            f'view {self.schema}."{self.name}": {self.chips} chip footprints (EPSG:{self.srid}), '
            f"columns {', '.join(self.columns)}",
            "QGIS: Layer > Add Layer > Add PostGIS Layers..., New connection with "
            f"host={c.get('host') or 'localhost'} port={c.get('port') or 5432} "
            f"database={c.get('dbname')} user={c.get('user')}; open schema {self.schema}, "
            f"layer {self.name}, feature id tile_id; style it by 'split' (Categorized)",
            f'psql: SELECT split, count(*) FROM {self.schema}."{self.name}" GROUP BY split;',
        ])


def _view_name(dataset: str) -> str:
    name = f"chips_map_{dataset}"
    if len(name.encode()) > 63:
        import hashlib

        name = f"chips_map_{dataset[:44]}_{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"
    return name


def map_view(conn: psycopg.Connection, dataset: str) -> MapView:
    """Create or refresh view ``pggeolearn."chips_map_<dataset>"``: chip footprints with
    tile_id, split, nodata_frac, orphan, current, one ``frac_<class>`` column per class
    (background included) and ``geom`` typed ``geometry(Polygon, srid)`` for QGIS."""
    ds = datasets.get(conn, dataset)
    dataset = ds.name  # "NAME@N" of the current version N is NAME
    name = _view_name(dataset)
    # the view is made by pggeolearn.chips_map_create (SECURITY DEFINER): no CREATE on schema
    # pggeolearn for maintainers; its columns follow the rule of the function's comment
    with db_errors(f"chips map {dataset}"), conn.transaction():
        columns = conn.execute("SELECT pggeolearn.chips_map_create(%s, %s)", [dataset, name]).fetchone()[0]
        n = conn.execute("SELECT count(*) FROM pggeolearn.chips WHERE dataset = %s",
                         [dataset]).fetchone()[0]
    info = conn.info
    conninfo = {"host": info.host, "port": info.port, "dbname": info.dbname, "user": info.user}
    return MapView("pggeolearn", name, n, ds.recipe.srid, columns, conninfo)
