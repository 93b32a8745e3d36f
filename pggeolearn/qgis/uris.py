"""QGIS data source strings for PostGIS tables (what QgsDataSourceUri writes), without QGIS."""

from __future__ import annotations

import psycopg

from pggeolearn.db.names import split_table

__all__ = ["connection_params", "layer_uri", "project_uri"]


def _q(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connection_params(conn: psycopg.Connection) -> dict[str, str]:
    """dbname, host (a socket directory for a local cluster), port, user: never a password."""
    info = conn.info
    return {"dbname": info.dbname, "host": info.host, "port": str(info.port), "user": info.user}


def layer_uri(conn: psycopg.Connection, table: str, *, raster: bool = False, column: str | None = None,
              geometry_type: str = "MultiPolygon", srid: int | None = None, key: str | None = "id") -> str:
    """The source of a layer on ``table``: QGIS's ``postgresraster`` provider (``raster=True``,
    column ``rast``) or ``postgres`` (column ``geom``, with key, SRID and geometry type: QGIS
    finds a vector layer's default style in layer_styles only when the type is given; no key:
    QGIS uses ctid)."""
    schema, name = split_table(table)
    p = connection_params(conn)
    parts = [f"dbname={_q(p['dbname'])}", f"host={p['host']}", f"port={p['port']}", f"user={_q(p['user'])}"]
    if not raster:
        parts += [*([f"key={_q(key)}"] if key else []), *([f"srid={int(srid)}"] if srid else []),
                  f"type={geometry_type}", "checkPrimaryKeyUnicity='0'"]
    parts.append(f"table={_ident(schema)}.{_ident(name)} ({column or ('rast' if raster else 'geom')})")
    return " ".join(parts)


def project_uri(conn: psycopg.Connection, schema: str, name: str, *, with_host: bool = True) -> str:
    """``postgresql:...`` URI of a project stored in ``schema.qgis_projects`` (QgsProject.read)."""
    from urllib.parse import quote, urlencode

    p = connection_params(conn)
    query = urlencode({"dbname": p["dbname"], "schema": schema, "project": name})
    if not with_host or p["host"].startswith("/"):
        # a socket directory does not fit in a URL host: libpq takes it from PGHOST
        return f"postgresql:?{query}"
    return f"postgresql://{quote(p['user'])}@{p['host']}:{p['port']}?{query}"
