"""Runs end (issue 11, item 5) and --resume onto other data (item 7), each observed defect first.

Observed on main: runs stuck ``running`` forever after kill -9 of predict and after a ~10 s
database restart during training (3 stream retries all fell inside the restart); a second
concurrent ``train --model X`` trained fully, then failed at save; ``--resume`` onto another
dataset was accepted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import test_stream
from psycopg import sql
from test_predict import UL, extent_of, load_array
from test_stream_faults import wait_for_backend
from test_train import TINY, make_train_dataset

from pggeolearn import datasets, errors, retry, runs
from pggeolearn.stream import GeoStream
from pggeolearn.training import train

chips_template_dsn, chips_dsn = test_stream.chips_template_dsn, test_stream.chips_dsn


@pytest.fixture
def tiny(chips_dsn):
    """Dataset ``tiny`` of test_stream's chip database (a clone for this test)."""
    with psycopg.connect(chips_dsn, autocommit=True) as c:
        return chips_dsn, datasets.get(c, "tiny")

ROOT = Path(__file__).resolve().parents[2]


def status(conn, run_id: int) -> tuple[str, str | None]:
    return conn.execute("SELECT status, error FROM pggeolearn.runs WHERE run_id = %s", [run_id]).fetchone()


def allow_connections(admin: psycopg.Connection, dbname: str, allow: bool) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
        sql.Identifier(dbname), sql.SQL("true" if allow else "false")))


def terminate_all(admin: psycopg.Connection, dbname: str) -> int:
    return admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s"
                         " AND pid <> pg_backend_pid()", [dbname]).fetchone()[0]


def start_cli(args: list[str], db_dsn: str, conn) -> subprocess.Popen:
    """``pggeolearn ARGS`` in a subprocess, returned once its run is in pggeolearn.runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (ROOT, ROOT / "tests", Path(__file__).parent))))
    proc = subprocess.Popen([sys.executable, "-m", "pggeolearn", "--dsn", db_dsn, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0]:
        if proc.poll() is not None:
            pytest.fail(f"{args[0]} ended before its run began: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{args[0]} did not start a run")
        time.sleep(0.1)
    return proc


def kill_9_then_reaped(proc: subprocess.Popen, conn) -> str:
    """kill -9; wait until the next look (reap) marks the run failed; its error."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    run_id, = conn.execute("SELECT run_id FROM pggeolearn.runs").fetchone()
    deadline = time.monotonic() + 10  # the server notices the closed socket
    while status(conn, run_id)[0] == "running":
        assert time.monotonic() < deadline
        runs.reap(conn)
        time.sleep(0.1)
    return status(conn, run_id)[1]


# ------------------------------------------------------------------------------ dead processes


def test_kill_9_of_predict_is_marked_failed_by_the_next_command(conn, db_dsn):
    load_array(conn, "public.img", np.full((3, 256, 256), 230, np.uint8), tile=64)
    proc = start_cli(["predict", "slow_predictor:model", "--extent", *map(str, extent_of(*UL, 256, 256)),
                      "--imagery", "public.img", "--out", "public.pred", "--no-progress"], db_dsn, conn)
    time.sleep(0.5)  # predicting
    assert kill_9_then_reaped(proc, conn).startswith("lost: the process running it ended without finishing")
    assert conn.execute("SELECT to_regclass('public.pred')").fetchone()[0] is None  # rolled back


def test_a_run_whose_session_ended_is_reaped_by_the_next_run(conn, db_dsn):
    dead = runs.Run.start(db_dsn, "predict", model="m")
    alive = runs.Run.start(db_dsn, "evaluate", model="m")
    assert runs.reap(conn) == []  # both sessions hold their locks
    dead.close()  # the process is gone without a word
    nxt = runs.Run.start(db_dsn, "predict", model="m")  # any command that starts a run looks
    assert status(conn, dead.run_id)[0] == "failed"
    assert status(conn, alive.run_id) == ("running", None)
    alive.finish({"ok": 1})
    nxt.fail("boom\nsecond line")
    assert status(conn, alive.run_id) == ("done", None)
    assert status(conn, nxt.run_id) == ("failed", "boom")
    alive.close()
    nxt.close()
    listed = runs.list_runs(conn)
    assert [r.run_id for r in listed] == [nxt.run_id, alive.run_id, dead.run_id]
    assert "failed: lost" in str(listed[-1])


def test_a_run_survives_a_lost_connection_and_takes_its_lock_again(conn, db_dsn):
    with runs.Run.start(db_dsn, "predict", window_s=10) as run:
        for pid in wait_for_backend(conn, "pggeolearn predict run"):
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        time.sleep(0.2)
        assert runs.reap(conn) == [run.run_id]  # its lock went with the session...
        run.heartbeat({"rows": 1})  # ...it reconnects, locks again and is running again
        assert status(conn, run.run_id) == ("running", None)
        assert runs.reap(conn) == []
        run.finish({"rows": 2})
    assert status(conn, run.run_id) == ("done", None)


def test_with_block_fails_the_run_on_an_exception(conn, db_dsn):
    with pytest.raises(ValueError), runs.Run.start(db_dsn, "evaluate") as run:
        raise ValueError("bad things")
    assert status(conn, run.run_id) == ("failed", "bad things")


# ------------------------------------------------------------------------------ one training per model


def test_second_training_of_a_model_is_refused_at_once(db_dsn, conn):
    make_train_dataset(conn)
    holder = runs.Run.start(db_dsn, "train", model="m", dataset="rects")
    with pytest.raises(errors.AlreadyExists, match=rf"model m is being trained right now \(run {holder.run_id}"):
        runs.Run.start(db_dsn, "train", model="m")
    started = time.monotonic()
    with pytest.raises(errors.AlreadyExists, match="being trained right now"):
        train(db_dsn, "rects", "m", epochs=50, **TINY)
    assert time.monotonic() - started < 30  # refused before any epoch, not at save
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 1
    # other models train meanwhile; a dead holder's reservation ends when it is reaped
    holder.close()
    runs.Run.start(db_dsn, "train", model="m").finish({})
    assert status(conn, holder.run_id)[0] == "failed"


def test_concurrent_train_processes_then_kill_9(db_dsn, conn):
    """A real `pggeolearn train` holds model m: the second is refused at once; after kill -9 of
    the first, its run is marked failed by the next command and m can be trained again."""
    make_train_dataset(conn)
    proc = start_cli(["train", "rects", "--model", "m", "--epochs", "1000", "--width", "4", "--depth", "1",
                      "--stem-stride", "1", "--no-progress"], db_dsn, conn)
    try:
        with pytest.raises(errors.AlreadyExists, match="model m is being trained right now"):
            train(db_dsn, "rects", "m", epochs=1, **TINY)
    finally:
        error = kill_9_then_reaped(proc, conn)
    assert error.startswith("lost: the process running it ended")
    assert train(db_dsn, "rects", "m", epochs=1, **TINY).saved


# ------------------------------------------------------------------------------ lost connections


def test_reconnect_window_defaults_to_a_minute_and_is_configurable(monkeypatch):
    monkeypatch.delenv(retry.ENV, raising=False)
    assert retry.Window().window_s == 60.0 >= 60
    monkeypatch.setenv(retry.ENV, "2.5")
    assert retry.Window().window_s == 2.5
    monkeypatch.setenv(retry.ENV, "soon")
    with pytest.raises(errors.ConfigError, match="PGGEOLEARN_RECONNECT_S"):
        retry.Window()
    w = retry.Window(1.0)
    delays = []
    while (d := w.next_delay()) is not None:
        delays.append(d)
        time.sleep(d)
    assert delays[:3] == [0.1, 0.2, 0.4] and sum(delays) <= 1.0 + 1e-6  # the last one cut short


def test_stream_rides_out_a_restart_longer_than_a_few_retries(tiny, pg_admin_dsn):
    """The server is unreachable for 3 s (3 quick retries took 0.7 s on main): the epoch completes."""
    dsn, ds = tiny
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    s = GeoStream(dsn, ds.name, batch_size=4, prefetch=1, chunk_size=4, shuffle=False,
                  reconnect_window_s=30)
    expected = s.plan(0)[0].tolist()
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        it = iter(s)
        batches = [next(it)]
        allow_connections(admin, dbname, False)
        try:
            assert terminate_all(admin, dbname) >= 1
            threading.Timer(3.0, allow_connections, (admin, dbname, True)).start()
            batches += list(it)
        finally:
            time.sleep(3.2)
            allow_connections(admin, dbname, True)
    assert [b["tile_id"].tolist() for b in batches] == expected
    assert s.reconnects > 3


def test_stream_gives_up_after_its_window_with_one_line(tiny, pg_admin_dsn):
    dsn, ds = tiny
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    s = GeoStream(dsn, ds.name, batch_size=4, prefetch=1, chunk_size=4, reconnect_window_s=1.5)
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        it = iter(s)
        next(it)
        allow_connections(admin, dbname, False)
        try:
            terminate_all(admin, dbname)
            started = time.monotonic()
            with pytest.raises(errors.ConnectionLost) as info:
                list(it)
            assert 1.0 < time.monotonic() - started < 10
        finally:
            allow_connections(admin, dbname, True)
    msg = str(info.value)
    assert "\n" not in msg and "could not resume" in msg and "window 1.5 s" in msg


def test_training_that_loses_the_server_fails_resumably(db_dsn, conn, pg_admin_dsn, monkeypatch):
    """After epoch 1 the server becomes unreachable: one typed line, the run ends failed (by the
    next command that looks), and --resume continues from epoch 1's checkpoint."""
    make_train_dataset(conn)
    dbname = conn.info.dbname
    monkeypatch.setenv(retry.ENV, "1")
    admin = psycopg.connect(pg_admin_dsn, autocommit=True)

    def cut(record):
        if record["epoch"] == 1:
            allow_connections(admin, dbname, False)
            terminate_all(admin, dbname)

    try:
        with pytest.raises(errors.ConnectionLost) as info:
            train(db_dsn, "rects", "m", epochs=3, on_epoch=cut, **TINY)
    finally:
        allow_connections(admin, dbname, True)
        admin.close()
    msg = str(info.value)
    assert "\n" not in msg and "failed after epoch 1" in msg and "--resume" in msg
    with psycopg.connect(db_dsn, autocommit=True) as c:
        runs.reap(c)
        [(run_id, st, has_checkpoint)] = c.execute(
            "SELECT run_id, status, checkpoint IS NOT NULL FROM pggeolearn.runs").fetchall()
    assert st == "failed" and has_checkpoint
    report = train(db_dsn, "rects", "m", epochs=2, resume=True, progress=False)
    assert report.resumed_from == 1 and len(report.history) == 2 and report.saved


# ------------------------------------------------------------------------------ --resume onto other data


def test_resume_onto_another_dataset_or_recipe_needs_force(db_dsn, conn):
    from test_train import stop_after

    make_train_dataset(conn, "one")
    make_train_dataset(conn, "other")
    r = train(db_dsn, "one", "m", epochs=2, on_epoch=stop_after(1), **TINY)
    assert r.interrupted
    with pytest.raises(errors.ConfigError, match="cannot resume m on dataset other: its checkpoint was "
                                                 "trained on dataset one .*--force"):
        train(db_dsn, "other", "m", epochs=2, resume=True, progress=False)
    # the same dataset, its recipe changed since
    conn.execute("UPDATE pggeolearn.datasets SET recipe_hash = 'changed' WHERE name = 'one'")
    with pytest.raises(errors.ConfigError, match="dataset one with another recipe"):
        train(db_dsn, "one", "m", epochs=2, resume=True, progress=False)
    report = train(db_dsn, "other", "m", epochs=2, resume=True, force=True, progress=False)
    assert report.resumed_from == 1 and any("--force" in n for n in report.notes)


def test_runs_command_lists_runs_and_marks_the_dead_failed(db_dsn):
    from click.testing import CliRunner

    from pggeolearn.cli.main import cli

    runner = CliRunner()
    assert runner.invoke(cli, ["--dsn", db_dsn, "runs"]).output == "no runs yet\n"
    dead = runs.Run.start(db_dsn, "train", model="m", dataset="d")
    dead.close()
    result = runner.invoke(cli, ["--dsn", db_dsn, "runs", "--model", "m"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"run {dead.run_id}: train m on d, started ")
    assert "failed: lost: the process running it ended without finishing" in result.output


def test_upgrade_0003_ends_runs_stuck_before_it(empty_db_dsn):
    """Runs stuck 'running' under 0002 (the observed defect): the newest training run of a model
    stays (the reaper ends it later if dead), the older ones are failed, so the index can exist."""
    from pggeolearn.db import schema

    schema.upgrade(empty_db_dsn, revision="0002")
    with psycopg.connect(empty_db_dsn, autocommit=True) as c:
        ids = [c.execute("INSERT INTO pggeolearn.runs (kind, model, status) VALUES (%s, %s, 'running')"
                         " RETURNING run_id", [k, m]).fetchone()[0]
               for k, m in (("train", "x"), ("train", "x"), ("predict", "x"), ("train", "y"))]
    assert schema.upgrade(empty_db_dsn) == schema.head_revision()
    with psycopg.connect(empty_db_dsn, autocommit=True) as c:
        assert [status(c, i)[0] for i in ids] == ["failed", "running", "running", "running"]
        assert sorted(runs.reap(c)) == ids[1:]  # nobody holds their locks: all dead
        with pytest.raises(psycopg.errors.UniqueViolation):
            for _ in range(2):
                c.execute("INSERT INTO pggeolearn.runs (kind, model) VALUES ('train', 'z')")
