"""Why a recipe query finds nothing: the SRIDs of the tables it reads, next to the grid's.

A filter such as ``WHERE ST_Intersects(rast, tile_geom)`` compares a lon/lat table with a
tile in a projected grid and matches nothing. :func:`no_rows_hint` plans the query (nothing
runs), lists the geometry and raster columns of the tables it scans with their SRIDs, and,
where they differ from the grid's, shows the filter that works.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pggeolearn.db import usersql
from pggeolearn.resources import sql_text

__all__ = ["no_rows_hint", "scanned_tables"]


def scanned_tables(conn: psycopg.Connection, query: sql.Composable, params: dict[str, Any]) -> list[str]:
    """``schema.table`` of every table the planned ``query`` scans (planned as the recipe
    sandbox role, nothing runs: :func:`pggeolearn.db.usersql.tables_read`)."""
    try:
        with usersql.sandbox(conn):
            found = usersql.tables_read(conn, query, params)
    except psycopg.Error:
        return []
    return sorted(f"{s}.{t}" for s, t in found)


def no_rows_hint(conn: psycopg.Connection, query: sql.Composable, params: dict[str, Any],
                 grid_srid: int, column: str) -> str:
    """``; it reads public.roads.geom (EPSG:4326), the grid is EPSG:32611: ...`` or ``""``."""
    tables = scanned_tables(conn, query, params)
    if not tables:
        return ""
    rows = conn.execute(sql_text("recipe_table_srids"), {"tables": tables}).fetchall()
    if not rows:
        return ""
    listed = ", ".join(f"{t}.{c} (EPSG:{s})" if s else f"{t}.{c} (SRID not declared)" for t, c, s in rows)
    other = sorted({s for _, _, s in rows if s and s != grid_srid})
    text = f"; it reads {listed}, the grid is EPSG:{grid_srid}"
    if other:
        example = (f"ST_Intersects(rast, ST_Transform(tile_geom, {other[0]}))" if column == "rast"
                   else f"geom && ST_Transform(tile_geom, {other[0]})")
        text += (f": compare in the table's CRS, e.g. WHERE {example} "
                 f"(or pggeolearn.tile_geom_in(tile_geom, {other[0]}))")
    return text
