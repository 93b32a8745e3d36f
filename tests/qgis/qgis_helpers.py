"""Run headless QGIS (Debian's python3-qgis, under /usr/bin/python3) from the tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("qgis_probe.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def qgis_missing() -> str | None:
    """Why QGIS cannot run here, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"}, timeout=60)
    return None if out.returncode == 0 else "QGIS Python bindings missing (apt: python3-qgis qgis-providers)"


_MISSING = qgis_missing()
needs_qgis = pytest.mark.skipif(_MISSING is not None and os.environ.get("CI") != "true",
                                reason=_MISSING or "")


def probe(spec: dict, tmp_path: Path, env: dict | None = None) -> dict:
    """Run qgis_probe.py on ``spec`` (see its docstring) and return its JSON report."""
    assert _MISSING is None, _MISSING
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run([SYSTEM_PYTHON, str(PROBE), str(path)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path),
                              **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
