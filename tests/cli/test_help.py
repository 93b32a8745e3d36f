"""Every command answers --help without touching a database or importing mxnet/torch (nor
matplotlib or pyogrio, which only the commands that draw or read vectors load)."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from pggeolearn.cli.main import cli


def _walk(group: click.Group, prefix: list[str]):
    for name, command in group.commands.items():
        yield prefix + [name]
        if isinstance(command, click.Group):
            yield from _walk(command, prefix + [name])


def test_every_command_has_help():
    runner = CliRunner()
    paths = list(_walk(cli, []))
    assert ["db", "up"] in paths
    for path in paths:
        result = runner.invoke(cli, path + ["--help"], env={"PGGEOLEARN_DSN": "host=/nowhere"})
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


def test_cli_import_is_light():
    code = ("import sys, pggeolearn.cli.main; "
            "bad = [m for m in ('mxnet', 'torch', 'matplotlib', 'pyogrio') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wkb_import_is_numpy_only():
    code = ("import sys, pggeolearn.wkb; "
            "print([m for m in ('mxnet', 'torch', 'rasterio', 'psycopg') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
