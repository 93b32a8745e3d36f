"""The embedded cluster: idempotent up/down, stale pid recovery, root path, missing binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from pggeolearn import errors
from pggeolearn.cli.main import cli
from pggeolearn.db import cluster as cl

pytestmark = pytest.mark.skipif(
    not any(Path(p).exists() for p in ["/usr/lib/postgresql"]) and os.environ.get("CI") != "true",
    reason="no PostgreSQL server installed",
)


@pytest.fixture
def cluster(tmp_path):
    c = cl.Cluster(tmp_path / "pgdata", settings={"fsync": "off"})
    yield c
    c.destroy()


def test_up_is_idempotent_and_down_stops(cluster):
    first = cluster.up()
    second = cluster.up()
    assert first.running and second.running and first.pid == second.pid
    with psycopg.connect(first.dsn) as conn:
        assert conn.execute("SELECT postgis_lib_version()").fetchone()[0].startswith("3.")
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == ""  # no TCP
    assert "DSN: host=" in first.describe() and str(cluster.datadir) in first.describe()
    stopped = cluster.down()
    assert not stopped.running
    assert not cluster.down().running  # stopping a stopped cluster is fine


def test_server_never_runs_as_root(cluster):
    status = cluster.up()
    owner = Path(f"/proc/{status.pid}").stat().st_uid
    assert owner != 0
    if os.geteuid() != 0:
        assert owner == os.geteuid()


def test_stale_pid_file_is_recovered(cluster):
    cluster.up()
    cluster.down()
    # a crash leaves postmaster.pid behind; after a reboot its pid may belong to another process
    (cluster.datadir / "postmaster.pid").write_text(f"{os.getpid()}\n{cluster.datadir}\n")
    assert not cluster.status().running
    status = cluster.up()
    assert status.running and status.pid != os.getpid()


def test_missing_binaries_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PGGEOLEARN_PG_BINDIR", str(tmp_path))
    with pytest.raises(errors.MissingDependency, match="postgresql-15-postgis-3"):
        cl.Cluster(tmp_path / "data").up()
    env = {**os.environ, "PGGEOLEARN_PG_BINDIR": str(tmp_path), "PGGEOLEARN_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pggeolearn", "db", "up"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "apt-get install postgresql-15-postgis-3" in proc.stderr


def test_missing_postgis_is_named(tmp_path, monkeypatch):
    real = cl.find_bindir()
    fake = tmp_path / "bin"
    fake.mkdir()
    for exe in ("initdb", "pg_ctl", "postgres"):
        (fake / exe).symlink_to(real / exe)
    monkeypatch.setenv("PGGEOLEARN_PG_BINDIR", str(fake))
    with pytest.raises(errors.MissingDependency, match="PostGIS is not installed"):
        cl.Cluster(tmp_path / "data").up()


def test_cli_up_init_version_down(tmp_path):
    runner = CliRunner()
    env = {"PGGEOLEARN_HOME": str(tmp_path), "PGGEOLEARN_DSN": ""}
    try:
        for args in (["db", "up"], ["db", "init"], ["db", "version"], ["db", "status"]):
            result = runner.invoke(cli, args, env=env, catch_exceptions=False)
            assert result.exit_code == 0, result.output
        assert "schema revision: 0001 (up to date)" in result.output or "running" in result.output
        version = runner.invoke(cli, ["db", "version"], env=env).output
        assert "up to date" in version and "PostGIS: 3." in version
    finally:
        result = runner.invoke(cli, ["db", "down"], env=env)
        assert "stopped" in result.output


def test_two_concurrent_db_up_both_succeed(tmp_path):
    """`db up` is idempotent, also when two run at once (a lock file beside the data directory)."""
    datadir = tmp_path / "pgdata"
    code = ("import sys; from pggeolearn.db import cluster as cl; "
            "s = cl.Cluster(sys.argv[1], settings={'fsync': 'off'}).up(); print(s.running)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(datadir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all(o.strip() == "True" for o, _ in outs)
    finally:
        cl.Cluster(datadir).destroy()
