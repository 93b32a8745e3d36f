"""The main job end to end, small: every step runs and every table it names exists."""

from __future__ import annotations

import psycopg

from pggeolearn.db.names import split_table
from pggeolearn.demo import run_demo


def test_demo_end_to_end(db_dsn, tmp_path):
    lines: list[str] = []
    report = run_demo(db_dsn, out=tmp_path / "demo", size_px=2048, epochs=2, minutes=1.0, jobs=2,
                      say=lines.append)
    text = str(report)
    assert "== pggeolearn demo: done" in text and db_dsn in text
    assert [name for name, _ in report.steps] == [
        "database", "load data", "dataset create", "chips build", "train", "predict", "evaluate"]
    with psycopg.connect(db_dsn) as conn:
        for table in report.tables:
            schema, name = split_table(table)
            assert conn.execute("SELECT to_regclass(%s)", [f"{schema}.{name}"]).fetchone()[0], table
        styled = conn.execute("SELECT count(*) FROM public.layer_styles").fetchone()[0]
        assert styled >= 3
    for picture in report.pictures.values():
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # idempotent: a second run replaces what the first wrote
    again = run_demo(db_dsn, out=tmp_path / "demo", size_px=2048, epochs=1, minutes=0.5, say=lines.append)
    assert again.tables.keys() == report.tables.keys()
