"""The embedded default: a private PostgreSQL + PostGIS cluster pggeolearn starts itself.

The cluster lives in one data directory and listens only on a Unix socket inside it (no TCP
unless a port is asked for with ``tcp=True``). PostgreSQL refuses to run as root, so when
pggeolearn runs as root the server runs as an unprivileged system user (``postgres`` when the
distribution created it, else ``pggeolearn``) that owns the data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pggeolearn import errors

INSTALL_HINT = "install them (Debian/Ubuntu: apt-get install postgresql-15-postgis-3)"
SUPERUSER = "postgres"  # not "pggeolearn": "$user" in search_path would pick our schema
DBNAME = "pggeolearn"
_PINNED = "-c search_path=public"  # never "$user" (CVE-2018-1058)
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "unix_socket_permissions": "0700",
    "shared_buffers": "'256MB'",
    "work_mem": "'64MB'",
    "maintenance_work_mem": "'256MB'",
    "synchronous_commit": "off",
    "max_connections": "50",
    "log_min_messages": "warning",
    "postgis.gdal_enabled_drivers": "'GTiff PNG JPEG'",  # ST_AsGDALRaster; out-db stays off
}


def default_datadir() -> Path:
    """``$PGGEOLEARN_HOME/pgdata``; as root /var/lib/pggeolearn/pgdata, else the XDG data dir."""
    home = os.environ.get("PGGEOLEARN_HOME")
    if home:
        return Path(home).expanduser() / "pgdata"
    if os.geteuid() == 0:
        return Path("/var/lib/pggeolearn/pgdata")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "pggeolearn" / "pgdata"


def find_bindir() -> Path:
    """The directory with initdb/pg_ctl/postgres: $PGGEOLEARN_PG_BINDIR, Debian's layout, PATH."""
    if os.environ.get("PGGEOLEARN_PG_BINDIR"):  # set by the user: use it and nothing else
        candidates = [os.environ["PGGEOLEARN_PG_BINDIR"]]
    else:
        candidates = _default_bindirs()
    for cand in candidates:
        if all((Path(cand) / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(cand)
    raise errors.MissingDependency(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def _default_bindirs() -> list[str]:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    return candidates


def postgis_available(bindir: Path) -> bool:
    """True when the PostGIS extension is installed for the server in ``bindir``."""
    pg_config = bindir / "pg_config"
    sharedirs = []
    if pg_config.exists():
        out = subprocess.run([str(pg_config), "--sharedir"], capture_output=True, text=True)
        if out.returncode == 0:
            sharedirs.append(out.stdout.strip())
    sharedirs.append(f"/usr/share/postgresql/{bindir.parent.name}")
    return any((Path(d) / "extension" / "postgis.control").exists() for d in sharedirs)


def server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pggeolearn"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pggeolearn"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("pggeolearn")


@dataclass
class Status:
    running: bool
    datadir: Path
    pid: int | None
    dsn: str
    port: int
    initialized: bool

    def describe(self) -> str:
        if not self.initialized:
            return f"no cluster in {self.datadir} (run: pggeolearn db up)"
        state = f"running (pid {self.pid})" if self.running else "stopped"
        lines = [
            f"embedded PostgreSQL: {state}",
            f"data directory: {self.datadir}",
            f"socket: {self.datadir}/.s.PGSQL.{self.port}",
            f"DSN: {self.dsn}",
            f'connect: psql "{self.dsn}"   (QGIS: host={self.datadir}, port={self.port}, '
            f"database={DBNAME}, user={SUPERUSER})",
        ]
        return "\n".join(lines)


class Cluster:
    """A private cluster in ``datadir``: ``up()``, ``down()``, ``status()``, ``dsn()``."""

    def __init__(self, datadir: str | Path, *, port: int = 5432, tcp: bool = False,
                 settings: dict[str, str] | None = None):
        self.datadir = Path(datadir).expanduser().absolute()
        self.port = port
        self.tcp = tcp
        self.settings = {**SERVER_SETTINGS, **(settings or {})}

    @classmethod
    def default(cls) -> Cluster:
        return cls(default_datadir(), port=int(os.environ.get("PGGEOLEARN_PORT", "5432")))

    # -- what a user sees -------------------------------------------------------------
    def dsn(self, dbname: str = DBNAME) -> str:
        host = "127.0.0.1" if self.tcp else str(self.datadir)
        return f"host={host} port={self.port} dbname={dbname} user={SUPERUSER}"

    @property
    def logfile(self) -> Path:
        return self.datadir / "server.log"

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def status(self) -> Status:
        pid = self._live_pid()
        return Status(pid is not None, self.datadir, pid, self.dsn(), self.port, self.initialized())

    # -- lifecycle ----------------------------------------------------------------------
    def up(self, *, dbname: str = DBNAME) -> Status:
        """Create (first time), start (if stopped) and make sure ``dbname`` has PostGIS. Idempotent."""
        bindir = find_bindir()
        if not postgis_available(bindir):
            raise errors.MissingDependency(f"PostGIS is not installed for {bindir}: {INSTALL_HINT}")
        with self._lock():  # two `db up` at once: the second waits, then finds it running
            if not self.initialized():
                self._initdb(bindir)
            if self._live_pid() is None:
                self._remove_stale_pid()
                self._start(bindir)
            self._ensure_database(dbname)
        return self.status()

    @contextlib.contextmanager
    def _lock(self, timeout_s: float = 120.0):
        """An exclusive lock file beside the data directory, held while creating/starting."""
        import fcntl

        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        path = self.datadir.parent / f".{self.datadir.name}.lock"
        with open(path, "a") as fh:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise errors.ClusterError(
                            f"another pggeolearn holds {path} for more than {timeout_s:g} s") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def down(self) -> Status:
        """Stop the server (fast shutdown); a stopped or absent cluster is not an error."""
        if self._live_pid() is not None:
            bindir = find_bindir()
            self._run([str(bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"])
        return self.status()

    def destroy(self) -> None:
        """Stop the server and delete the data directory."""
        self.down()
        shutil.rmtree(self.datadir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------
    def _run(self, cmd: list[str], *, hint: str = "", **kwargs) -> subprocess.CompletedProcess:
        user = server_user()
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            kwargs.setdefault("cwd", "/")
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            tail = detail[-1] if detail else f"exit code {proc.returncode}"
            raise errors.ClusterError(f"{Path(cmd[0]).name} failed: {tail}{hint}")
        return proc

    def _initdb(self, bindir: Path) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        user = server_user()
        if user is not None:
            os.chown(self.datadir, user.pw_uid, user.pw_gid)
            for parent in self.datadir.parents:  # the server user must reach its own directory
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)  # traverse only: nothing becomes listable
        os.chmod(self.datadir, 0o700)
        self._run([
            str(bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions",
        ])
        conf = [f"{k} = {v}" for k, v in self.settings.items()]
        conf.append(f"unix_socket_directories = '{self.datadir}'")
        conf.append(f"port = {self.port}")
        if self.tcp:
            conf.append("listen_addresses = '127.0.0.1'")
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write("\n# pggeolearn embedded cluster\n" + "\n".join(conf) + "\n")

    def _start(self, bindir: Path) -> None:
        self._run([str(bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                   "-w", "-t", "60", "start"], hint=f" (server log: {self.logfile})")

    def _pid_from_file(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    def _live_pid(self) -> int | None:
        """The postmaster's pid when it is really running for this data directory."""
        pid = self._pid_from_file()
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not cmdline or not cmdline[0].endswith((b"postgres", b"postmaster")):
            return None
        return pid

    def _remove_stale_pid(self) -> None:
        """A pid file left by a crash (or a reboot that reused the pid) blocks a start: drop it."""
        pidfile = self.datadir / "postmaster.pid"
        if pidfile.exists():
            pidfile.unlink()
        for lock in self.datadir.glob(".s.PGSQL.*.lock"):
            lock.unlink()

    def _ensure_database(self, dbname: str) -> None:
        import psycopg
        from psycopg import sql

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(self.dsn("postgres"), autocommit=True, options=_PINNED)
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise errors.ClusterError(f"server did not accept connections: {exc}") from exc
                time.sleep(0.2)
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        with psycopg.connect(self.dsn(dbname), autocommit=True, options=_PINNED) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis_raster")
