"""Lineage of a model: source tables -> recipe (dataset version) -> chips -> model -> runs.

Read only. What each step recorded: a dataset version is a row of ``pggeolearn.dataset_versions``
(its recipe and hash, kept after the version is dropped); the chips of version N of NAME are
stored under NAME (the current version) or NAME@N (an old one); a model records its dataset,
version and recipe hash; a run records the model, the dataset version it read and its hash.
The source tables come from the recipe's query plans (:func:`pggeolearn.refresh.tables_read`).
"""

from __future__ import annotations

import psycopg

from pggeolearn import datasets, errors, refresh
from pggeolearn.db.errors import db_errors
from pggeolearn.training import registry

__all__ = ["model_lineage"]

MAX_RUNS = 20  # the latest runs listed; older ones are counted


def model_lineage(conn: psycopg.Connection, name: str) -> list[str]:
    """Lines for ``pggeolearn model show``: where model ``name`` comes from and what used it."""
    rec = registry.get(conn, name, weights=False)
    base = rec.dataset.split("@", 1)[0]
    ds = _dataset_of(conn, rec)
    version = rec.dataset_version or (ds.version if ds else None)
    history = {v.version: v for v in datasets.versions(conn, base)}.get(version)
    lines = ["lineage:"]

    if ds is None:
        lines.append("  source tables: unknown (the dataset version is dropped)")
    else:
        try:
            tables = refresh.tables_read(conn, ds.name)
            lines.append("  source tables: " + (", ".join(f"{s}.{t}" for s, t in tables) or "none"))
        except errors.PggeolearnError as exc:
            lines.append(f"  source tables: unknown ({exc})")

    ref = f"{base}@{version}" if version else base
    recipe = f"  -> recipe: dataset {ref}, recipe {history.recipe_hash if history else rec.recipe_hash}"
    if history is not None:
        recipe += f", created {history.created_at:%Y-%m-%d %H:%M}"
        if history.state == "current":
            recipe += " (the current version)"
        elif history.state == "old":
            recipe += f" (an old version, stored as {history.row})"
        else:
            recipe += f" (dropped {history.dropped_at:%Y-%m-%d %H:%M}; its recipe is kept)"
    elif ds is None:
        recipe += " (not stored any more)"
    lines.append(recipe)

    lines.append("  -> chips: " + (_chips(conn, ds, rec) if ds is not None else "dropped"))
    model = (f"  -> model: {rec.name} ({rec.framework})"
             + (f", created {rec.created_at:%Y-%m-%d %H:%M}" if rec.created_at else "")
             + f", trained on recipe {rec.recipe_hash}")
    if history is not None and history.recipe_hash != rec.recipe_hash:
        model += f" (not the version's {history.recipe_hash}: trained before versions were recorded)"
    lines.append(model)
    lines.append("  -> runs: " + _runs(conn, rec))
    return lines


def _dataset_of(conn: psycopg.Connection, rec: registry.ModelRecord) -> datasets.Dataset | None:
    """The catalog row of the dataset version the model was trained on, if it still exists
    (a model from before versions: its dataset, if the recipe is still the same)."""
    try:
        ds = datasets.get(conn, rec.dataset_ref)
    except (errors.ConfigError, errors.NotFound):
        return None
    if rec.dataset_version is None and ds.recipe_hash != rec.recipe_hash:
        return None
    return ds


def _chips(conn: psycopg.Connection, ds: datasets.Dataset, rec: registry.ModelRecord) -> str:
    with db_errors(f"chips of {ds.name}"):
        rows = conn.execute(
            "SELECT coalesce(split, 'unsplit'), count(*), min(built_at), max(built_at),"
            " count(*) FILTER (WHERE built_at > %s), count(*) FILTER (WHERE recipe_hash <> %s)"
            " FROM pggeolearn.chips WHERE dataset = %s GROUP BY 1 ORDER BY 1",
            [rec.created_at, rec.recipe_hash, ds.name]).fetchall()
    if not rows:
        return f"none stored under {ds.name}"
    order = {"train": 0, "val": 1, "test": 2}
    rows.sort(key=lambda r: (order.get(r[0], 3), r[0]))
    total = sum(r[1] for r in rows)
    first, last = min(r[2] for r in rows), max(r[3] for r in rows)
    text = (f"{total} under {ds.name} (" + ", ".join(f"{r[0]} {r[1]}" for r in rows) + ")"
            f", built {first:%Y-%m-%d %H:%M:%S} .. {last:%Y-%m-%d %H:%M:%S}")
    later, other = sum(r[4] for r in rows), sum(r[5] for r in rows)
    if later and rec.created_at is not None:
        text += f"; {later} rebuilt after the model was trained (chips refresh)"
    if other:
        text += f"; {other} from another recipe"
    return text


def _runs(conn: psycopg.Connection, rec: registry.ModelRecord) -> str:
    with db_errors(f"runs of model {rec.name}"):
        rows = conn.execute(
            "SELECT run_id, kind, status, dataset, dataset_version FROM pggeolearn.runs"
            " WHERE model = %s ORDER BY run_id DESC", [rec.name]).fetchall()
    if not rows:
        return "none"
    mine = (rec.dataset.split("@", 1)[0], rec.dataset_version)
    parts = []
    for run_id, kind, status, dataset, version in reversed(rows[:MAX_RUNS]):
        where = ""
        if dataset is not None and (dataset.split("@", 1)[0], version) != mine:
            where = f" on {dataset.split('@', 1)[0]}" + (f"@{version}" if version else "")
        parts.append(f"{kind} {run_id} {status}{where}")
    more = f" ({len(rows) - MAX_RUNS} earlier)" if len(rows) > MAX_RUNS else ""
    return ", ".join(parts) + more
