"""``train --nproc N``: data-parallel training in N processes on this machine.

:func:`train_parallel` starts N worker processes (``spawn``); each runs
:func:`pggeolearn.training.loop.train_rank` as one rank of a group
(:mod:`pggeolearn.training.group`) and streams its own shard of every split from PostgreSQL:

* **torch**: ``torch.distributed`` over TCP on a free local port (gloo; NCCL for CUDA
  tensors), DistributedDataParallel; collectives time out after ``PGGEOLEARN_DIST_TIMEOUT_S``
  (default 300) seconds.
* **mxnet**: a ``dist_sync`` kvstore, as MXNet's ``tools/launch.py --launcher local`` sets it
  up: a scheduler and one server (child processes, ``DMLC_*`` environment) and N workers.

The launcher supervises them: a rank that fails or dies stops all the others and its error is
raised here as one line (:class:`~pggeolearn.errors.WorkerFailed`, or the rank's own
pggeolearn error); Ctrl-C (SIGINT here) asks every rank to stop after the same step, which ends
the run as an interrupted single-process run ends (resumable); every child is killed when this
process exits or dies (``PR_SET_PDEATHSIG``), so none is left behind.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from pggeolearn import datasets, errors
from pggeolearn.db.connect import connect
from pggeolearn.training.common import parse_device
from pggeolearn.training.loop import (
    DEFAULTS,
    NAME_RE,
    TrainOptions,
    TrainReport,
    check_nproc,
    split_counts,
    train_rank,
)

GRACE_S = 60.0  # after Ctrl-C: how long the ranks get to finish the step and save
TERM_S = 5.0  # after SIGTERM: how long before SIGKILL
ADDR = "127.0.0.1"


def train(dsn: str | None, dataset: str, model_name: str, *, nproc: int = 1,
          **options: Any) -> TrainReport:
    """Train a U-Net on ``dataset``'s train split, validate on val, store it as ``model_name``.

    ``options`` are the fields of :class:`TrainOptions` (``framework``, ``epochs``,
    ``batch_size``, ``lr``, ``schedule``, ``device``, ``seed``, ``width``, ``depth``,
    ``stem_stride``, ``class_weights``, ``augment``, ``weight_decay``, ``patience``,
    ``time_limit_min``, ``overwrite``, ``resume``, ``plot``, ``progress``, ``on_epoch``).
    ``nproc`` > 1 trains data-parallel in that many processes on this machine; a process that
    torchrun or MXNet's launcher started is one rank of theirs (:func:`train_launched`).
    Errors a user can cause are one-line :class:`~pggeolearn.errors.PggeolearnError`s and leave
    no model behind. Ctrl-C returns a report whose ``stopped`` starts with ``interrupted``.
    """
    opts = _options(options)
    if not NAME_RE.match(model_name or ""):
        raise errors.ConfigError(f"bad model name {model_name!r}: letters, digits, '_', '.', '-' (max 63)")
    if nproc != 1:
        return train_parallel(dsn, dataset, model_name, nproc, opts)
    launcher = launched_by()
    if launcher is not None:
        return train_launched(dsn, dataset, model_name, opts, launcher)
    return train_rank(dsn, dataset, model_name, opts)


def _options(options: dict[str, Any]) -> TrainOptions:
    try:
        return TrainOptions(**options)
    except TypeError as exc:
        raise errors.ConfigError(f"unknown training option: {exc}") from None


def dist_timeout_s() -> float:
    return float(os.environ.get("PGGEOLEARN_DIST_TIMEOUT_S", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _framework_of(dsn: str | None, model_name: str, opts: Any) -> str:
    """The framework the ranks will train with (on --resume: the checkpoint's)."""
    if opts.framework is not None or not opts.resume:
        return opts.framework or DEFAULTS["framework"]
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT params -> 'options' ->> 'framework' FROM pggeolearn.runs WHERE kind = 'train'"
            " AND model = %s AND checkpoint IS NOT NULL ORDER BY run_id DESC LIMIT 1",
            [model_name]).fetchone()
    return (row[0] if row else None) or DEFAULTS["framework"]


def rank_device(device: str, rank: int, world: int, gpus: int) -> str:
    """The device of one rank: the CPU, or GPU ``rank`` (of the ids given, or of all)."""
    kind, ids = parse_device(device)
    if kind == "cpu" or (kind == "auto" and gpus == 0):
        return "cpu"
    pool = ids if ids is not None else list(range(gpus))
    if len(pool) < world:
        raise errors.ConfigError(f"--nproc {world} needs a GPU per process, but {len(pool)} "
                                 f"{'were given' if ids is not None else 'are there'} (--device {device})")
    return f"gpu:{pool[rank]}"


# ----------------------------------------------------------------------------------------------
# the parent


def train_parallel(dsn: str | None, dataset: str, model_name: str, nproc: int, opts: Any):
    """Train in ``nproc`` processes; returns rank 0's TrainReport (``rank_weights``: the
    digest of every rank's final weights)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise errors.ConfigError(f"--nproc must be >= 1, not {nproc}")
    with connect(dsn, autocommit=True) as conn:
        ds = datasets.get(conn, dataset)
        check_nproc(nproc, split_counts(conn, ds.name).get("train", 0), ds.name)
    framework = _framework_of(dsn, model_name, opts)
    on_epoch = opts.on_epoch
    child_opts = replace(opts, on_epoch=None)
    try:
        pickle.dumps(child_opts)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise errors.ConfigError(f"with nproc > 1 the training options must be picklable "
                                 f"(on_chips a module-level function): {exc}") from None
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    # the cores shared out: MXNet reads its own variable first (pggeolearn.mxnet sets it)
    env = {"OMP_NUM_THREADS": threads, "MXNET_OMP_MAX_THREADS": threads}
    servers: list[subprocess.Popen] = []
    if framework == "torch":
        spec = {"framework": "torch", "port": free_port()}
    else:
        spec = {"framework": "mxnet"}
        env |= {"DMLC_PS_ROOT_URI": ADDR, "DMLC_PS_ROOT_PORT": str(free_port()),
                "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": str(nproc)}
    spec |= {"dsn": dsn, "dataset": dataset, "model": model_name, "opts": child_opts,
             "world": nproc, "env": env}
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(spec, i, results, stop), name=f"pggeolearn-train-{i}")
             for i in range(nproc)]
    finished = False
    try:
        if framework == "mxnet":
            servers = [_kv_process(role, env) for role in ("scheduler", "server")]
        for p in procs:
            p.start()
        report = _supervise(procs, servers, results, stop, on_epoch)
        finished = True
        return report
    finally:
        _end(procs, servers, graceful=finished)


def _kv_process(role: str, env: dict[str, str]) -> subprocess.Popen:
    """A kvstore scheduler or server: importing mxnet with ``DMLC_ROLE`` set runs it until the
    workers leave. In a session of its own: a terminal's Ctrl-C is for the launcher."""
    code = ("from pggeolearn.training.launch import die_with_parent; die_with_parent(); "
            "import pggeolearn.mxnet")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env, "DMLC_ROLE": role},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    proc.role = role
    return proc


def _supervise(procs: list, servers: list, results: Any, stop: Any, on_epoch: Any):
    world = len(procs)
    done: dict[int, Any] = {}
    deadline: list[float] = []

    def interrupt(*_: Any) -> None:
        if deadline:  # a second Ctrl-C: no more waiting
            raise KeyboardInterrupt
        stop.set()  # every rank stops after the same step and keeps its checkpoint
        deadline.append(time.monotonic() + GRACE_S)

    # a handler, not KeyboardInterrupt in the middle of reading the queue
    previous = signal.signal(signal.SIGINT, interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        while len(done) < world:
            try:
                kind, rank, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                _check_alive(procs, servers, done)
                if deadline and time.monotonic() > deadline[0]:
                    raise KeyboardInterrupt from None
                continue
            if kind == "epoch" and on_epoch is not None:
                on_epoch(payload)
            elif kind == "error":
                raise payload
            elif kind == "done":
                done[rank] = payload
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    report = done[0]
    report.rank_weights = [done[r].weights_sha256 for r in range(world)]
    return report


def _check_alive(procs: list, servers: list, done: dict) -> None:
    for i, p in enumerate(procs):
        if p.exitcode not in (None, 0) and i not in done:
            raise errors.WorkerFailed(f"training process {i} of {len(procs)} died "
                                      f"(exit code {p.exitcode}); the others were stopped")
    for s in servers:
        if s.poll() not in (None, 0) and len(done) < len(procs):
            err = (s.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise errors.WorkerFailed(f"the MXNet kvstore's {s.role} exited with code {s.returncode}: {err}")


def _end(procs: list, servers: list, *, graceful: bool) -> None:
    """Every child gone: ``graceful`` (all ranks reported) gives them TERM_S to exit, else
    they are terminated at once; then killed."""
    deadline = time.monotonic() + (TERM_S if graceful else 0.0)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
    for s in servers:
        if s.poll() is None:
            try:
                s.wait(timeout=TERM_S)  # a server leaves once its workers did
            except subprocess.TimeoutExpired:
                s.terminate()
    for p in procs:
        p.join(TERM_S)
        if p.is_alive():
            p.kill()
            p.join()
    for s in servers:
        try:
            s.wait(timeout=TERM_S)
        except subprocess.TimeoutExpired:
            s.kill()
            s.wait()
        if s.stderr is not None:
            s.stderr.close()


# ----------------------------------------------------------------------------------------------
# a rank


def _worker(spec: dict[str, Any], index: int, results: Any, stop: Any) -> None:
    """One rank: join the group, train, report (``("done" | "error" | "epoch", rank, x)``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher turns Ctrl-C into `stop`
    signal.signal(signal.SIGTERM, _stopped)  # unwinds: rank 0's run row says why it failed
    die_with_parent()
    os.environ.update(spec["env"])
    if spec["framework"] == "mxnet":
        os.environ["DMLC_ROLE"] = "worker"
    rank, group = index, None
    try:
        group = _group(spec, index)
        rank = group.rank
        opts = spec["opts"]
        opts = replace(opts, device=rank_device(opts.device, rank, group.world, _gpus(spec["framework"])),
                       progress=opts.progress and group.lead,
                       on_epoch=(lambda record: results.put(("epoch", rank, record))) if group.lead else None)
        report = train_rank(spec["dsn"], spec["dataset"], spec["model"], opts, group, stop)
        results.put(("done", rank, report))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the launcher as one line
        results.put(("error", rank, _one_line(exc, rank, spec["world"])))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # reported: the end is quiet
        if group is not None:
            group.close()


def _stopped(*_: Any) -> None:
    raise errors.WorkerFailed("stopped by the launcher: another training process failed")


def _group(spec: dict[str, Any], index: int):
    from pggeolearn.training.group import MxGroup

    if spec["framework"] == "mxnet":
        return MxGroup()
    return _torch_group(spec["opts"].device, index, spec["world"], ADDR, spec["port"])


def _torch_group(device: str, rank: int, world: int, addr: str | None, port: int | None):
    import torch

    from pggeolearn.training.group import TorchGroup

    kind, _ = parse_device(device)
    cuda = kind != "cpu" and torch.cuda.is_available()
    return TorchGroup(rank, world, addr, port, cuda=cuda, timeout_s=dist_timeout_s())


def launched_by(environ: Any = os.environ) -> str | None:
    """Which outside launcher started this process as one rank: ``torchrun`` (``RANK`` and
    ``WORLD_SIZE`` > 1 set), MXNet's ``tools/launch.py`` (``DMLC_ROLE=worker``; ``server`` or
    ``scheduler``: the same command is the kvstore's), or None."""
    role = environ.get("DMLC_ROLE")
    if role in ("server", "scheduler"):
        return "mxnet-" + role
    if role == "worker":
        return "mxnet"
    if "RANK" in environ and int(environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    return None


def train_launched(dsn: str | None, dataset: str, model_name: str, opts: Any, launcher: str):
    """This process as one rank of a group an outside launcher started (several machines):
    rank 0 writes the run and the model and returns the full report, as with --nproc."""
    if launcher.startswith("mxnet-"):
        import pggeolearn.mxnet  # noqa: F401 - with DMLC_ROLE set, runs the role, then exits

        raise errors.ConfigError(f"DMLC_ROLE={launcher[6:]}, but mxnet was imported before it was "
                                 "set, so the kvstore role did not run: set it before Python starts")
    framework = _framework_of(dsn, model_name, opts)
    want = "mxnet" if launcher == "mxnet" else "torch"
    if framework != want:
        raise errors.ConfigError(f"this process was started by {launcher}, which trains "
                                 f"--framework {want}, not {framework}")
    if want == "mxnet":
        from pggeolearn.training.group import MxGroup

        group = MxGroup()
        local_rank, local_world = group.rank, group.world
    else:
        env = os.environ
        group = _torch_group(opts.device, int(env["RANK"]), int(env["WORLD_SIZE"]), None, None)
        local_rank = int(env.get("LOCAL_RANK", group.rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", group.world))
    try:
        opts = replace(opts, device=rank_device(opts.device, local_rank, local_world, _gpus(want)),
                       progress=opts.progress and group.lead,
                       on_epoch=opts.on_epoch if group.lead else None)
        return train_rank(dsn, dataset, model_name, opts, group)
    finally:
        group.close()


def _gpus(framework: str) -> int:
    if framework == "mxnet":
        from pggeolearn.training.models_mx import num_gpus

        return num_gpus()
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _one_line(exc: BaseException, rank: int, world: int) -> errors.PggeolearnError:
    """The rank's error as the launcher raises it: a pggeolearn error as it is (one line
    already), anything else as WorkerFailed naming the rank."""
    if isinstance(exc, errors.PggeolearnError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001, S110 - falls through to the generic line
            pass
    first = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return errors.WorkerFailed(f"training process {rank} of {world} failed: {what}")
