"""How fast the command starts: ``pggeolearn --help`` and ``pggeolearn dataset list`` against
``python -c "import click, psycopg"`` (the floor: the two libraries every command needs).

Run: ``python benchmarks/bench_startup.py [--dsn DSN] [--repeat 5]`` (about 20 s).

Each command runs as a fresh process (this checkout first on PYTHONPATH), the three in turn,
``--repeat`` rounds; the table shows the best wall time of each and its ratio to the floor
(target: at most 2x). ``dataset list`` connects to a scratch database holding one dataset.
Then the heavy modules each command imported (none of Alembic, SQLAlchemy, GeoAlchemy2, MXNet,
torch should be there: ``db init/upgrade`` and training import them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import conditions, print_table, scratch_database  # noqa: E402
from bench_stream import BANDS, PX, fill  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("alembic", "sqlalchemy", "geoalchemy2", "mxnet", "torch", "numpy", "rasterio", "shapely")
# runs the CLI in-process after the import, then names the heavy top-level modules it loaded
_PROBE = ("import sys, json\nfrom pggeolearn.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
          "except SystemExit:\n    pass\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
          " & set(sys.argv[0].split(',')))), file=sys.stderr)")


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def heavy_modules(args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.replace("sys.argv[0]", repr(",".join(HEAVY))), *args],
                         env=_env(), check=True, capture_output=True, text=True)
    return json.loads(out.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", help="server for the scratch database (default: a temporary embedded cluster)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(conditions())
    with scratch_database(args.dsn) as dsn:
        blank = (np.zeros((BANDS, PX, PX), np.uint8), np.zeros((PX, PX), np.uint8))
        fill(dsn, "startup", 4, [blank])
        commands = {
            'python -c "import click, psycopg"': [sys.executable, "-c", "import click, psycopg"],
            "pggeolearn --help": [sys.executable, "-m", "pggeolearn", "--help"],
            "pggeolearn dataset list": [sys.executable, "-m", "pggeolearn", "--dsn", dsn, "dataset", "list"],
        }
        best = {name: float("inf") for name in commands}
        for _ in range(args.repeat):
            for name, argv in commands.items():
                best[name] = min(best[name], run_once(argv))
        floor = best['python -c "import click, psycopg"']
        heavy = {"pggeolearn --help": heavy_modules(["--help"]),
                 "pggeolearn dataset list": heavy_modules(["--dsn", dsn, "dataset", "list"])}
    print_table(f"Start-up, best of {args.repeat} (fresh process each; target <= 2x the floor)",
                ["command", "seconds", "x floor", "heavy modules imported"],
                [[name, f"{t:.3f}", f"{t / floor:.2f}", ", ".join(heavy.get(name, [])) or "-"]
                 for name, t in best.items()])


if __name__ == "__main__":
    main()
