"""The tutorials in docs/ run as written: their bash, sql and python blocks, in order.

One embedded cluster in a temporary PGGEOLEARN_HOME serves all of them, and the tutorials
build on each other (the DBA's dataset is the ML engineer's and the QGIS user's).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```(bash|sql|python)\n(.*?)^```", re.S | re.M)
TUTORIALS = ["dba.md", "ml.md", "qgis.md"]

pytestmark = pytest.mark.skipif(shutil.which("osm2pgsql") is None and os.environ.get("CI") != "true",
                                reason="osm2pgsql is not installed")


def blocks(name: str) -> list[tuple[str, str]]:
    return BLOCK.findall((DOCS / name).read_text())


def run_block(kind: str, code: str, cwd: Path, env: dict[str, str]) -> str:
    if kind == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    elif kind == "sql":
        cmd = ["bash", "-euo", "pipefail", "-c",
               'psql "$(pggeolearn db dsn)" -X -q -v ON_ERROR_STOP=1 -f -']
    else:
        cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          input=code if kind == "sql" else None, timeout=900)
    assert proc.returncode == 0, f"{kind} block failed:\n{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("tutorials")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k != "PGGEOLEARN_DSN"}
    env["PGGEOLEARN_HOME"] = str(work / "home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    yield work, env
    subprocess.run(["pggeolearn", "db", "down"], env=env, capture_output=True)


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs_as_written(workdir, name):
    if not (DOCS / name).exists():
        pytest.fail(f"docs/{name} is missing")
    work, env = workdir
    found = blocks(name)
    assert found, f"docs/{name} has no runnable blocks"
    outputs = [run_block(kind, code, work, env) for kind, code in found]
    if name == "dba.md":
        assert "256 | 256 | 3857 | 8BUI" in "".join(outputs).replace("  ", " ")
