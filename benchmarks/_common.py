"""Shared by the benchmarks: a scratch PostGIS database and a table printer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from pggeolearn.db import cluster as cl
from pggeolearn.db import schema


def _shared_data() -> Path:
    """The real data: $PGGEOLEARN_DATA, else shared/data inside the checkout, else beside it."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(os.environ["PGGEOLEARN_DATA"])] if os.environ.get("PGGEOLEARN_DATA") else []
    candidates += [repo / "shared" / "data", repo.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


SHARED_DATA = _shared_data()


@contextlib.contextmanager
def scratch_database(dsn: str | None = None) -> Iterator[str]:
    """A new database with PostGIS + schema pggeolearn: on ``dsn``'s server (PGGEOLEARN_BENCH_DSN)
    or on an embedded cluster started in a temporary directory. Dropped afterwards."""
    dsn = dsn or os.environ.get("PGGEOLEARN_BENCH_DSN")
    with contextlib.ExitStack() as stack:
        if not dsn:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pgl-bench-"))
            cluster = cl.Cluster(Path(tmp) / "pgdata", settings={"fsync": "off"})
            cluster.up()
            stack.callback(cluster.destroy)
            dsn = cluster.dsn("postgres")
        name = f"pgl_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        target = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        try:
            with psycopg.connect(target, autocommit=True) as c:
                c.execute("CREATE EXTENSION IF NOT EXISTS postgis; CREATE EXTENSION IF NOT EXISTS postgis_raster")
            schema.upgrade(target)
            yield target
        finally:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def timed(fn, *args, repeat: int = 1, **kwargs) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, out


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def _spin(seconds: float) -> float:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.process_time()


def cores_free(seconds: float = 1.5) -> float:
    """How many cores two busy processes actually get right now (2.0 on an idle 2-core box)."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(2) as pool:
        return sum(pool.map(_spin, [seconds, seconds])) / seconds


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq
    steal ...), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


_TICKS_AT_START = cpu_ticks()


def steal_share(since: list[int] | None = _TICKS_AT_START) -> float | None:
    """The share of CPU time the hypervisor gave to other guests since ``since`` (a
    :func:`cpu_ticks`; default: when this module was imported), from /proc/stat's steal column:
    on a shared cloud machine the cause of most run-to-run spread in wall time."""
    now = cpu_ticks()
    if now is None or since is None or len(now) < 8:
        return None
    delta = [b - a for a, b in zip(since, now, strict=False)]
    return delta[7] / sum(delta) if sum(delta) else 0.0


def conditions() -> str:
    """One line to print beside every table: commit, cores, cores free, load average and the CPU
    time the hypervisor stole since the benchmark started."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        commit += "+changes" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    line = (f"commit {commit}; {os.cpu_count()} cores, two busy processes got {cores_free():.2f}; "
            f"load average {load}")
    steal = steal_share()
    return line if steal is None else f"{line}; hypervisor steal {steal:.0%} since start"
