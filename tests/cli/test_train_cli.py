"""``pggeolearn train`` and ``pggeolearn model ...``: what a user sees, success and failure,
including a real Ctrl-C (SIGINT) and ``--resume``."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from PIL import Image

from pggeolearn.cli.main import cli
from pggeolearn.training import launch, registry

_spec = importlib.util.spec_from_file_location(
    "train_fixtures", Path(__file__).resolve().parents[1] / "integration" / "test_train.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_train_dataset = _fixtures.make_train_dataset

TINY = ["--width", "4", "--depth", "1", "--stem-stride", "1", "--batch-size", "4", "--lr", "0.02",
        "--no-progress"]


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it (main() prints errors, not cli)."""
    return subprocess.run([sys.executable, "-m", "pggeolearn", *args], capture_output=True,
                          text=True, timeout=180, **kwargs)


@pytest.fixture
def rects(conn):
    make_train_dataset(conn)
    return conn


def test_train_then_model_list_show_export_drop(db_dsn, rects, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "curves.png"
    result = runner.invoke(cli, ["--dsn", db_dsn, "train", "rects", "--model", "m", "--epochs", "2",
                                 "--plot", str(plot), *TINY])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "model m (mxnet on cpu(0)), dataset rects: 2 epoch(s) run" in out
    assert "val mIoU" in out and "all background" in out and "majority class (= all background)" in out
    assert "saved model m in pggeolearn.models" in out and f"wrote {plot}" in out
    with Image.open(plot) as im:
        assert im.size == (1120, 428)
        assert len(set(im.convert("RGB").getdata())) > 5  # lines, not a blank canvas

    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "list"])
    assert result.exit_code == 0 and result.output.startswith("m\tmxnet\trects\t16px\tval mIoU 0.")
    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "show", "m"])
    assert result.exit_code == 0 and "classes: 0=background, 1=class1" in result.output
    assert "architecture: unet width 4 depth 1 stem stride 1" in result.output
    # lineage: the dataset version and recipe training recorded, its chips, the training run
    ds_hash = rects.execute("SELECT recipe_hash FROM pggeolearn.datasets WHERE name = 'rects'").fetchone()[0]
    assert "trained on dataset rects@1 (recipe " in result.output
    assert "\nlineage:\n  source tables: public.img_rects, public.poly_rects\n" in result.output
    assert f"  -> recipe: dataset rects@1, recipe {ds_hash}, created " in result.output
    assert "  -> chips: 22 under rects (train 16, val 4, test 2), built " in result.output
    assert "  -> model: m (mxnet), created " in result.output
    assert "  -> runs: train " in result.output and " done\n" in result.output

    zip_path = tmp_path / "m.zip"
    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "export", "m", "--out", str(zip_path)])
    assert result.exit_code == 0 and zip_path.exists(), result.output
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16), dtype=np.uint8)
    expected = registry.load(rects, "m", device="cpu").predict_proba(x)
    assert np.array_equal(registry.load_file(zip_path, device="cpu").predict_proba(x), expected)
    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "import", str(zip_path), "--name", "m2"])
    assert result.exit_code == 0 and "imported model m2 (mxnet, dataset rects)" in result.output

    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "drop", "m"])
    assert result.exit_code == 0 and "dropped model m" in result.output
    result = runner.invoke(cli, ["--dsn", db_dsn, "model", "list"])
    assert result.output.startswith("m2\t")


def test_errors_are_one_line(db_dsn, rects, tmp_path):
    conn = rects
    conn.execute("INSERT INTO pggeolearn.models (name, dataset, recipe_hash, framework, architecture,"
                 " hyperparameters, classes, normalization, tile_px, resolution, srid, bands, weights,"
                 " metrics, package_version) VALUES ('taken', 'rects', 'x', 'mxnet', '{}', '{}', '{}',"
                 " '{}', 16, 1, 3857, 3, '\\x00', '{}', '0')")
    cases = [
        (["train", "rects", "--model", "taken"], "error: model taken exists (use --overwrite"),
        (["train", "nope", "--model", "m"], "error: unknown dataset 'nope'"),
        (["train", "rects", "--model", "m", "--depth", "4", "--stem-stride", "4"],
         "error: tiles of 16px do not halve 4 times after a stride-4 stem"),
        (["train", "rects", "--model", "m", "--depth", "1", "--device", "gpu:0"], "error: GPU 0 was asked for"),
        (["train", "rects", "--model", "m", "--resume"], "error: no checkpoint of model m"),
        (["train", "rects", "--model", "m", "--nproc", "0"], "error: --nproc must be >= 1, not 0"),
        (["train", "rects", "--model", "m", "--nproc", "17"],
         "error: --nproc 17 is more than the 16 train chips of dataset rects: every process needs"),
        (["model", "show", "nope"], "error: unknown model 'nope' (known: taken)"),
        (["model", "drop", "nope"], "error: unknown model 'nope'"),
        (["model", "export", "taken", "--out", str(tmp_path / "no" / "x.zip")], "error: folder"),
    ]
    for args, message in cases:
        result = run("--dsn", db_dsn, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 0


def interrupt_after_first_checkpoint(conn, db_dsn: str, model: str, *args: str,
                                     wait_s: float = 120) -> tuple[subprocess.Popen, str, str, set[int]]:
    """``pggeolearn train rects --model MODEL ARGS`` for 500 epochs, SIGINT once the first
    epoch's checkpoint is stored: ``(process, stdout, stderr, its children before SIGINT)``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pggeolearn", "--dsn", db_dsn, "train", "rects",
                             "--model", model, "--epochs", "500", "--patience", "0", *args, *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:  # wait for the first epoch's checkpoint
            row = conn.execute("SELECT checkpoint IS NOT NULL FROM pggeolearn.runs WHERE model = %s",
                               [model]).fetchone()
            if row and row[0]:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            pytest.fail(f"no checkpoint within {wait_s} s")
        children = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err, children


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(db_dsn, rects):
    conn = rects
    proc, out, err, _ = interrupt_after_first_checkpoint(conn, db_dsn, "c")
    assert proc.returncode == 130, (out, err)
    assert "stopped: interrupted (Ctrl-C) after epoch" in out
    assert "resume with: pggeolearn train rects --model c --resume" in out
    assert "Traceback" not in err
    status, error, done = conn.execute(
        "SELECT status, error, jsonb_array_length(outputs -> 'epochs') FROM pggeolearn.runs"
        " WHERE model = 'c'").fetchone()
    assert status == "failed" and error.startswith("interrupted after epoch") and done >= 1

    result = run("--dsn", db_dsn, "train", "rects", "--model", "c", "--resume", "--epochs", str(done + 1),
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"(resumed after epoch {done})" in result.stdout and "stopped: completed" in result.stdout
    with psycopg.connect(db_dsn) as c:
        assert c.execute("SELECT jsonb_array_length(metrics -> 'epochs') FROM pggeolearn.models"
                         " WHERE name = 'c'").fetchone()[0] == done + 1


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _left(pids: set[int], wait_s: float = 10) -> list[str]:
    """The command lines of ``pids`` still alive after ``wait_s`` (multiprocessing's resource
    tracker leaves when it reads EOF from the process that is gone)."""
    deadline = time.monotonic() + wait_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            for p in pids if _alive(p)]


@pytest.mark.parametrize("framework, processes, device", [
    ("mxnet", 4, "cpu(0)"),  # 2 ranks, the kvstore's scheduler and server (+ spawn's tracker)
    ("torch", 2, "cpu"),
])
def test_nproc_ctrl_c_stops_every_process_and_resume_finishes(db_dsn, rects, framework, processes, device):
    """--nproc 2: SIGINT to the command stops both ranks after the same step, keeps the
    checkpoint, exits 130, leaves no process; --resume with --nproc 2 finishes."""
    if framework == "torch":
        pytest.importorskip("torch")
    conn = rects
    proc, out, err, children = interrupt_after_first_checkpoint(
        conn, db_dsn, "p", "--nproc", "2", "--framework", framework, wait_s=150)
    assert len(children) >= processes
    assert proc.returncode == 130, (out, err)
    assert "stopped: interrupted (Ctrl-C) after epoch" in out and "Traceback" not in err
    assert f"({framework} on 2 processes, rank 0 on {device})" in out
    assert _left(children) == []
    status, error, done = conn.execute(
        "SELECT status, error, jsonb_array_length(outputs -> 'epochs') FROM pggeolearn.runs"
        " WHERE model = 'p'").fetchone()
    assert status == "failed" and error.startswith("interrupted after epoch") and done >= 1

    result = run("--dsn", db_dsn, "train", "rects", "--model", "p", "--resume", "--epochs", str(done + 1),
                 "--nproc", "2", "--no-progress")  # the framework: the checkpoint's
    assert result.returncode == 0, result.stderr
    assert f"(resumed after epoch {done})" in result.stdout and "stopped: completed" in result.stdout
    assert f"({framework} on 2 processes" in result.stdout
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs WHERE model = 'p'").fetchone()[0] == 2


def test_torchrun_starts_the_ranks(db_dsn, rects):
    """What several machines run, on one: torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT, and `pggeolearn train` in each process is one rank of that group."""
    pytest.importorskip("torch")
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m", "pggeolearn",
         "--dsn", db_dsn, "train", "rects", "--model", "tr", "--framework", "torch", "--epochs", "2", *TINY],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "model tr (torch on 2 processes, rank 0 on cpu), dataset rects: 2 epoch(s) run" in out
    assert "rank 1 of 2: 2 epoch(s) in " in out and "saved model tr in pggeolearn.models" in out
    assert rects.execute("SELECT count(*), min(params ->> 'nproc') FROM pggeolearn.runs"
                         " WHERE model = 'tr'").fetchone() == (1, "2")
    result = run("--dsn", db_dsn, "train", "rects", "--model", "tr2", "--epochs", "1", *TINY,
                 env={**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "1", "PGGEOLEARN_DIST_TIMEOUT_S": "5"})
    assert result.returncode == 1 and result.stderr.startswith(
        "error: this process was started by torchrun, which trains --framework torch, not mxnet")


def test_mxnet_launcher_environment_starts_the_ranks(db_dsn, rects):
    """What MXNet's tools/launch.py runs on each machine, on one: the same command with
    DMLC_ROLE scheduler, server and worker (x2), and the DMLC_PS_ROOT_* of the scheduler."""
    port = launch.free_port()
    env = {**os.environ, "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port),
           "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2"}
    cmd = [sys.executable, "-m", "pggeolearn", "--dsn", db_dsn, "train", "rects", "--model", "mxl",
           "--epochs", "2", *TINY]
    procs = [subprocess.Popen(cmd, env={**env, "DMLC_ROLE": role}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for role in ("scheduler", "server", "worker", "worker")]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    workers = sorted(o[0] for o in outs[2:])
    assert workers[0].startswith("model mxl (mxnet on 2 processes, rank 0 on cpu(0))")
    assert "saved model mxl in pggeolearn.models" in workers[0]
    assert workers[1].startswith("rank 1 of 2: 2 epoch(s) in ")
    assert rects.execute("SELECT count(*), min(params ->> 'nproc') FROM pggeolearn.runs"
                         " WHERE model = 'mxl'").fetchone() == (1, "2")


def test_plot_without_matplotlib_is_one_line_before_training(tmp_path):
    """matplotlib is the optional ``plot`` extra: --plot without it fails at once, in one line
    that says how to install it (no database is reached, nothing is trained)."""
    code = ("import sys; sys.modules['matplotlib'] = None; from pggeolearn.cli.main import main; "
            f"main(['--dsn', 'host=/nowhere', 'train', 'rects', '--model', 'm', '--plot', "
            f"{str(tmp_path / 'c.png')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --plot draws with matplotlib, which is not installed: pip install 'pggeolearn[plot]'"]


def test_framework_torch_without_torch_is_one_line(db_dsn, rects):
    """PyTorch is optional: --framework torch where it does not import (hidden here, so the test
    runs with or without it) is one line saying how to install it, and writes nothing."""
    code = ("import sys; sys.modules['torch'] = None; from pggeolearn.cli.main import main; "
            f"main(['--dsn', {db_dsn!r}, 'train', 'rects', '--model', 'm', '--framework', 'torch', "
            "'--depth', '1', '--no-progress'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(
        "error: --framework torch needs PyTorch (pip install 'pggeolearn[torch]')"), proc.stderr
    assert rects.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 0
