"""Roles, grants and pinned search_paths: what ``db init`` sets up and ``db check`` verifies.

Roles (cluster-wide, NOLOGIN; created when the installing role may, else ``db check`` says so):

* ``pggeolearn_recipe``: the role recipe SQL runs as. Owns only the sandbox functions
  (``recipe_rows``, ``image_tile``, ``label_tile``); SELECT on ``pggeolearn.datasets`` and on
  what a DBA grants with ``pggeolearn grant``. Never a member of anything.
* ``pggeolearn_reader``: stream, show, evaluate (SELECT on the catalog, runs recipe SQL).
* ``pggeolearn_trainer``: reader + writes models and runs.
* ``pggeolearn_maintainer``: trainer + datasets and chips (predictions/imports go into schemas
  the DBA grants CREATE on).

Login roles get one of the three: ``GRANT pggeolearn_maintainer TO alice``.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pggeolearn import errors
from pggeolearn.db.errors import first_line
from pggeolearn.db.usersql import RECIPE_ROLE

READER, TRAINER, MAINTAINER = "pggeolearn_reader", "pggeolearn_trainer", "pggeolearn_maintainer"
ROLES = (RECIPE_ROLE, READER, TRAINER, MAINTAINER)
SANDBOXED = ("pggeolearn.recipe_rows(text)", "pggeolearn.image_tile(text, integer)",
             "pggeolearn.label_tile(text, integer)", "pggeolearn.recipe_plan(text)")
# large-object functions PUBLIC may run by default; allowed even in READ ONLY transactions
LO_FUNCTIONS = ("lo_creat", "lo_create", "lo_from_bytea", "lo_put", "lo_get", "lo_open",
                "lo_close", "loread", "lowrite", "lo_lseek", "lo_lseek64", "lo_tell", "lo_tell64",
                "lo_truncate", "lo_truncate64", "lo_unlink", "lo_import", "lo_export")


def _try(conn: psycopg.Connection, stmt: str | sql.Composable, notes: list[str], what: str,
         params=None) -> bool:
    try:
        with conn.transaction():  # a savepoint: a refusal leaves the install going
            conn.execute(stmt, params)
        return True
    except psycopg.Error as exc:
        notes.append(f"{what}: {first_line(exc)}")
        return False


def install(conn: psycopg.Connection) -> list[str]:
    """After the sql/NN_*.sql files: roles, grants, pinned search_path, sandbox ownership,
    dangerous defaults revoked. Idempotent; what is not permitted is returned (and reported by
    :func:`check`), never silently skipped."""
    notes: list[str] = []
    superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    path = conn.execute("SELECT pggeolearn.pinned_search_path()").fetchone()[0]
    # 1. every function of the schema runs with a pinned search_path (whoever wrote its file)
    for (ident,) in conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pggeolearn' AND p.prokind IN ('f', 'p')").fetchall():
        conn.execute(sql.SQL("ALTER ROUTINE {} SET search_path = {}").format(
            sql.SQL(ident), sql.SQL(path)))
    # 2. roles
    for role in ROLES:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
        if not exists:
            _try(conn, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)), notes,
                 f"cannot create role {role}")
    have = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                       [list(ROLES)])}
    for member, group in ((TRAINER, READER), (MAINTAINER, TRAINER)):
        if {member, group} <= have and not conn.execute(
                "SELECT pg_has_role(%s, %s, 'MEMBER')", [member, group]).fetchone()[0]:
            _try(conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(member)),
                 notes, f"cannot make {member} a member of {group}")
    # 3. grants in this database
    postgis = conn.execute(
        "SELECT DISTINCT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname IN ('postgis', 'postgis_raster')").fetchall()
    stmts: list[sql.Composable] = []
    if RECIPE_ROLE in have:
        stmts += [sql.SQL("GRANT USAGE ON SCHEMA pggeolearn TO {}").format(sql.Identifier(RECIPE_ROLE)),
                  sql.SQL("GRANT SELECT ON pggeolearn.datasets TO {}").format(sql.Identifier(RECIPE_ROLE)),
                  # sampling queries (GeoStream sampling=) weigh chips by what the store knows
                  # of them, never by their pixels
                  sql.SQL("GRANT SELECT (dataset, tile_id, geom, split, nodata_frac, class_counts, "
                          "recipe_hash, built_at) ON pggeolearn.chips TO {}").format(
                              sql.Identifier(RECIPE_ROLE)),
                  sql.SQL("GRANT SELECT ON pggeolearn.chip_scores TO {}").format(
                      sql.Identifier(RECIPE_ROLE))]
        stmts += [sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(s), sql.Identifier(RECIPE_ROLE))
                  for (s,) in postgis]
    if READER in have:
        r = sql.Identifier(READER)
        stmts += [sql.SQL("GRANT USAGE ON SCHEMA pggeolearn TO {}").format(r),
                  sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA pggeolearn TO {}").format(r)]
        stmts += [sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(s), r) for (s,) in postgis]
        for fn in SANDBOXED:
            stmts += [sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(sql.SQL(fn)),
                      sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(fn), r)]
    if TRAINER in have:
        t = sql.Identifier(TRAINER)
        stmts += [sql.SQL("GRANT INSERT, UPDATE, DELETE ON pggeolearn.models, pggeolearn.runs, "
                          "pggeolearn.chip_scores TO {}").format(t),
                  sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pggeolearn TO {}").format(t)]
    if MAINTAINER in have:
        m = sql.Identifier(MAINTAINER)
        stmts += [sql.SQL("GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pggeolearn TO {}").format(m),
                  sql.SQL("REVOKE INSERT, UPDATE, DELETE ON pggeolearn.alembic_version FROM {}").format(m)]
    for stmt in stmts:
        _try(conn, stmt, notes, "grant")
    # 4. the sandbox: SECURITY DEFINER, owned by the recipe role
    if RECIPE_ROLE in have:
        rr = sql.Identifier(RECIPE_ROLE)
        if not superuser:  # ALTER ... OWNER: we must be a member, the role needs CREATE meanwhile
            _try(conn, sql.SQL("GRANT {} TO CURRENT_USER").format(rr), notes, f"cannot join {RECIPE_ROLE}")
            _try(conn, sql.SQL("GRANT CREATE ON SCHEMA pggeolearn TO {}").format(rr), notes, "grant")
        for fn in SANDBOXED:
            _try(conn, sql.SQL("ALTER FUNCTION {} SECURITY DEFINER").format(sql.SQL(fn)), notes,
                 f"cannot make {fn} SECURITY DEFINER")
            _try(conn, sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(sql.SQL(fn), rr), notes,
                 f"cannot give {fn} to {RECIPE_ROLE}")
        if not superuser:
            _try(conn, sql.SQL("REVOKE CREATE ON SCHEMA pggeolearn FROM {}").format(rr), notes, "revoke")
    # the chips map view is created by the schema's owner for maintainers
    _try(conn, "ALTER FUNCTION pggeolearn.chips_map_create(text, text) SECURITY DEFINER", notes, "chips map")
    _try(conn, "REVOKE EXECUTE ON FUNCTION pggeolearn.chips_map_create(text, text) FROM PUBLIC", notes, "chips map")
    if MAINTAINER in have:
        _try(conn, sql.SQL("GRANT EXECUTE ON FUNCTION pggeolearn.chips_map_create(text, text) TO {}").format(
            sql.Identifier(MAINTAINER)), notes, "chips map")
        _try(conn, sql.SQL("GRANT EXECUTE ON FUNCTION pggeolearn.record_change() TO {}").format(
            sql.Identifier(MAINTAINER)), notes, "dataset watch")
    # 5. dangerous defaults: large objects work inside READ ONLY transactions
    for fn in _lo_signatures(conn):
        _try(conn, sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(sql.SQL(fn)), notes,
             f"cannot revoke {fn} from PUBLIC")
    return notes


def _lo_signatures(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace"
        " AND p.proname = ANY(%s) ORDER BY 1", [list(LO_FUNCTIONS)])]


def check(conn: psycopg.Connection) -> list[str]:
    """Open holes, one line each (empty: the sandbox holds as designed)."""
    holes: list[str] = []
    roles = dict(conn.execute(
        "SELECT rolname, (rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR rolcanlogin)"
        " FROM pg_roles WHERE rolname = ANY(%s)", [list(ROLES)]).fetchall())
    for role in ROLES:
        if role not in roles:
            holes.append(f"role {role} does not exist (run pggeolearn db init as a role with CREATEROLE, "
                         f"or: CREATE ROLE {role} NOLOGIN)")
    if RECIPE_ROLE in roles:
        if roles[RECIPE_ROLE]:
            holes.append(f"role {RECIPE_ROLE} may log in or holds SUPERUSER/CREATEROLE/CREATEDB/BYPASSRLS "
                         f"(fix: ALTER ROLE {RECIPE_ROLE} NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS NOLOGIN)")
        for (group,) in conn.execute(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
                " JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s", [RECIPE_ROLE]):
            holes.append(f"role {RECIPE_ROLE} is a member of {group}: recipe SQL gets its privileges "
                         f"(fix: REVOKE {group} FROM {RECIPE_ROLE})")
    have_schema = conn.execute("SELECT to_regnamespace('pggeolearn') IS NOT NULL").fetchone()[0]
    if not have_schema:
        holes.append("schema pggeolearn is not installed here (run: pggeolearn db init)")
        return holes
    for fn in SANDBOXED:
        row = conn.execute(
            "SELECT p.prosecdef, pg_get_userbyid(p.proowner) FROM pg_proc p WHERE p.oid = to_regprocedure(%s)",
            [fn]).fetchone()
        if row is None:
            holes.append(f"function {fn} is missing (run: pggeolearn db upgrade)")
        elif not row[0] or row[1] != RECIPE_ROLE:
            holes.append(f"function {fn} does not run as {RECIPE_ROLE} (owner {row[1]}"
                         f"{'' if row[0] else ', not SECURITY DEFINER'}): recipe SQL would run as the caller "
                         "(run pggeolearn db init as a superuser or a role with CREATEROLE)")
    for (ident,) in conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'pggeolearn'::regnamespace"
            " AND p.prokind IN ('f', 'p') AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c"
            " WHERE c LIKE 'search_path=%%') ORDER BY 1"):
        holes.append(f"function {ident} has no pinned search_path (run: pggeolearn db init)")
    for fn in _lo_signatures(conn):
        if conn.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", [RECIPE_ROLE, fn]).fetchone()[0] \
                if RECIPE_ROLE in roles else False:
            holes.append(f"{RECIPE_ROLE} may run {fn} (large objects are writable in READ ONLY transactions; "
                         f"fix as a superuser: REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC)")
    if RECIPE_ROLE in roles:
        for (priv,) in conn.execute(
                "SELECT r FROM unnest(ARRAY['pg_read_server_files', 'pg_write_server_files',"
                " 'pg_execute_server_program', 'pg_signal_backend', 'pg_read_all_data',"
                " 'pg_write_all_data']) AS r WHERE to_regrole(r) IS NOT NULL"
                " AND pg_has_role(%s, r, 'USAGE')", [RECIPE_ROLE]):
            holes.append(f"{RECIPE_ROLE} has the privileges of {priv} (fix: REVOKE {priv} FROM {RECIPE_ROLE})")
    for nsp, who in conn.execute(
            "SELECT DISTINCT n.nspname, coalesce(g.rolname, 'PUBLIC') FROM pg_extension e"
            " JOIN pg_namespace n ON n.oid = e.extnamespace, aclexplode(n.nspacl) a"
            " LEFT JOIN pg_roles g ON g.oid = a.grantee"
            " WHERE e.extname IN ('postgis', 'postgis_raster') AND a.privilege_type = 'CREATE'"
            " AND a.grantee <> n.nspowner ORDER BY 1, 2"):
        holes.append(f"{who} may CREATE in schema {nsp}, where PostGIS lives: it can shadow PostGIS "
                     f"functions (CVE-2018-1058; fix: REVOKE CREATE ON SCHEMA {nsp} FROM {who})")
    for fn, owner in conn.execute(
            "SELECT p.oid::regprocedure::text, r.rolname FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.prosecdef AND r.rolsuper"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass"
            " AND d.objid = p.oid AND d.deptype = 'e')"
            " AND has_function_privilege(%s, p.oid, 'EXECUTE') ORDER BY 1",
            [RECIPE_ROLE if RECIPE_ROLE in roles else "public"]):
        holes.append(f"SECURITY DEFINER function {fn} owned by superuser {owner} is executable by recipe "
                     f"SQL (fix: REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC)")
    return holes


def grant(conn: psycopg.Connection, target: str, *, schema: bool = False) -> str:
    """Let recipe SQL read a table, or every table of a schema (now and, for tables this role
    creates later, by default privileges). Returns what was granted."""
    from pggeolearn.db.names import split_table

    r = sql.Identifier(RECIPE_ROLE)
    if not conn.execute("SELECT to_regrole(%s) IS NOT NULL", [RECIPE_ROLE]).fetchone()[0]:
        raise errors.SchemaError(f"role {RECIPE_ROLE} does not exist (run: pggeolearn db init)")
    try:
        with conn.transaction():
            if schema:
                s = sql.Identifier(target.strip().strip('"'))
                conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r))
                conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r))
                conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}")
                             .format(s, r))
                return (f"recipe SQL ({RECIPE_ROLE}) may read every table of schema {target}, and those "
                        "you create there later")
            sch, name = split_table(target)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(sch), r))
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(sch, name), r))
            return f"recipe SQL ({RECIPE_ROLE}) may read {sch}.{name}"
    except psycopg.Error as exc:
        raise errors.DatabaseError(f"grant {target}: {first_line(exc)}") from exc


def grant_quietly(conn: psycopg.Connection, schema: str, name: str) -> None:
    """After an import: let recipe SQL read the new table (when the role exists; our own table)."""
    r = sql.Identifier(RECIPE_ROLE)
    if not conn.execute("SELECT to_regrole(%s) IS NOT NULL", [RECIPE_ROLE]).fetchone()[0]:
        return
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), r))
    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(schema, name), r))


def grant_role(conn: psycopg.Connection, level: str, login: str) -> str:
    """``GRANT pggeolearn_<level> TO login`` (level: reader, trainer, maintainer)."""
    role = {"reader": READER, "trainer": TRAINER, "maintainer": MAINTAINER}.get(level)
    if role is None:
        raise errors.ConfigError(f"unknown level {level!r} (reader, trainer or maintainer)")
    try:
        with conn.transaction():
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(login)))
    except psycopg.Error as exc:
        raise errors.DatabaseError(f"GRANT {role} TO {login}: {first_line(exc)}") from exc
    return f"{login} is now a member of {role}"
