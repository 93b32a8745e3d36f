"""A prediction run: :func:`predict` checks the options and the output tables, loads the model,
plans (:mod:`.plan`), records the run in ``pggeolearn.runs`` (running -> done | failed), then
goes one row band of windows at a time: imagery read ahead by a thread (:mod:`.source`),
windows batched through the model, stitched (:mod:`.stitch`), every finished tile row written
(:mod:`.sink`). All writes are one transaction: any failure (imagery SQL error, a model that
raises, Ctrl-C, a lost connection) rolls everything back and marks the run ``failed``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import psycopg
from tqdm import tqdm

from pggeolearn import errors, outputs, runs
from pggeolearn.db.connect import connect, dsn_of
from pggeolearn.db.schema import require_schema
from pggeolearn.db.tables import TableName
from pggeolearn.predict.grid import NODATA, PROB_SCALE, Grid
from pggeolearn.predict.model import Predictor, call_model, load_model
from pggeolearn.predict.options import DEFAULT_OVERLAP, PredictOptions
from pggeolearn.predict.plan import OutputNames, Plan, make_plan, output_names, outputs_of
from pggeolearn.predict.sink import Writer, create_schemas
from pggeolearn.predict.source import BandReader, looks_like_sql
from pggeolearn.predict.stitch import Stitcher, needed_windows
from pggeolearn.tta import TTA

__all__ = ["PredictReport", "predict"]


@dataclass
class PredictReport:
    """What :func:`predict` did; ``str()`` is what the CLI prints."""

    run_id: int
    model: str
    out: str
    prob_out: str | None
    polygons_out: str | None
    grid: Grid
    window: int
    overlap: int
    stitch: str
    tile_px: int
    windows: int = 0
    windows_predicted: int = 0
    tiles: int = 0
    tiles_empty: int = 0  # output tiles without any imagery, not written
    polygons: int = 0
    pieces: int = 0
    min_pixels: int = 1
    dropped: int = 0  # objects inside one tile smaller than min_pixels, never vectorized
    appended: bool = False
    overviews: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        g = self.grid
        minx, miny, maxx, maxy = g.bounds
        lines = [
            f"run {self.run_id}: model {self.model} predicted {g.width} x {g.height} px "
            f"(EPSG:{g.srid}, {g.res:.6g} units/px, extent {minx:.3f} {miny:.3f} {maxx:.3f} {maxy:.3f}) "
            f"in {self.seconds:.1f} s",
            f"windows: {self.windows_predicted} of {self.windows} predicted ({self.window} px, overlap "
            f"{self.overlap}, {self.stitch} stitching); tiles: {self.tiles} written, "
            f"{self.tiles_empty} without imagery skipped",
            f"class raster {self.out}: 8BUI, {self.tile_px} px tiles, NODATA {NODATA} where there "
            f"was no imagery" + (f"; overviews {', '.join(self.overviews)}" if self.overviews else ""),
        ]
        if self.prob_out:
            lines.append(f"probabilities {self.prob_out}: one 8BUI band per class, "
                         f"p = value / {PROB_SCALE}, NODATA {NODATA}")
        if self.polygons_out:
            kept = (f"objects under {self.min_pixels} px left out ({self.dropped} inside tiles, before "
                    f"vectorizing), holes under {self.min_pixels} px filled" if self.min_pixels > 1
                    else "every object kept")
            lines.append(f"polygons {self.polygons_out}: {self.polygons} objects (from {self.pieces} "
                         f"tile pieces merged across tile borders); {kept}")
        lines += [f"note: {n}" for n in self.notes]
        if self.timing:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timing.items()))
        lines.append("QGIS: Browser > PostgreSQL > this database: the tables open styled "
                     "(default styles in public.layer_styles)")
        return "\n".join(lines)

    def outputs(self) -> dict[str, Any]:
        return {"class_raster": self.out, "probabilities": self.prob_out,
                "polygons": self.polygons_out, "tiles": self.tiles, "tiles_empty": self.tiles_empty,
                "polygon_count": self.polygons, "pieces": self.pieces, "min_pixels": self.min_pixels,
                "objects_dropped": self.dropped,
                "windows": self.windows, "windows_predicted": self.windows_predicted,
                "width": self.grid.width, "height": self.grid.height, "srid": self.grid.srid,
                "resolution": self.grid.res, "overviews": self.overviews, "appended": self.appended,
                "seconds": round(self.seconds, 3),
                "timing": {k: round(v, 3) for k, v in self.timing.items()}, "notes": self.notes}


def predict(dsn_or_conn: psycopg.Connection | str | None, model: str | Predictor,
            options: PredictOptions | None = None, **kw: Any) -> PredictReport:
    """Run ``model`` over an extent (or a dataset split's area) and write the outputs.

    The keyword arguments are the fields of :class:`PredictOptions` (``out`` is required);
    given ``options`` too, they replace its fields.
    ``model``: a registry name, ``module:attribute``, or a :class:`Predictor` object.
    ``extent``: (minx, miny, maxx, maxy) in ``extent_srid`` (default: the model's CRS); or
    ``dataset`` (and ``split``): the area of that split's chips, imagery defaulting to the
    dataset's image SQL. ``imagery``: a raster table name or SQL returning ``rast`` that sees the
    ``tile`` relation (``tile_geom``, ``tile_rast``, ``tile_srid``, ``tile_res``) like a
    recipe's image SQL. ``out``: the class raster table; ``out_prob`` and ``out_polygons``
    (or ``polygons``) beside it. ``overlap`` defaults to 32 pixels (at most a quarter of the
    model's window). ``min_pixels`` (4; 0 keeps all): objects of fewer pixels (an object
    across tile borders counted whole) are left out of the polygon table before they are
    vectorized, and smaller holes filled; the class raster keeps every pixel the model gave.
    The output grid is the model's dataset's (origin and exact resolution, so predictions fall
    on the chips' pixels) when the model has one in the same CRS and pixel size; else the
    imagery's own grid when it is the model's; else pixel edges on multiples of the resolution.
    ``grid_origin`` (x, y) says otherwise. The outputs: the package docstring; stitching:
    :mod:`.stitch`; reading and memory: :mod:`.source`; writing and atomicity: :mod:`.sink`.
    """
    started = time.perf_counter()
    try:
        opts = replace(options, **kw) if options is not None else PredictOptions(**kw)
    except TypeError as exc:
        raise errors.ConfigError(f"bad predict option: {exc}") from None
    opts.check()
    names = output_names(opts.out, opts.polygons, opts.probabilities, opts.vectorize, opts.overviews)
    dsn = dsn_of(dsn_or_conn)
    with connect(dsn, autocommit=True, application_name="pggeolearn predict") as control:
        require_schema(control)
        reads = [] if opts.imagery is None or looks_like_sql(opts.imagery) else [TableName.parse(opts.imagery)]
        outputs.check(control, outputs_of(names, opts.overviews), reads=reads, overwrite=opts.overwrite,
                      append=opts.append, force=opts.force)
        p = load_model(control, model, device=opts.device)
        if opts.tta:
            p = TTA(p)
        model_name = model if isinstance(model, str) else str(p.name)
        opts = _resolve_overlap(opts, p)
        plan = make_plan(control, p, model_name, opts, names)
        outputs.refuse_reads(outputs_of(names, opts.overviews),
                             plan.imagery.tables_read(control, plan.grid, opts.timeout_s))
        g = plan.grid
        with runs.Run.start(dsn, "predict", model=model_name, dataset=opts.dataset,
                            params=_run_params(opts, names, p), extent=g.bounds, srid=g.srid) as run:
            report = PredictReport(run.run_id, model_name, names.show(names.out), names.show(names.prob),
                                   names.show(names.polygons), g, int(p.tile_px), opts.overlap, opts.stitch,
                                   opts.tile_px, notes=list(plan.notes))
            _execute(dsn, plan, names, report, opts, started)  # a failure rolls the tables back
        from pggeolearn.qgis.project import refresh_after

        report.notes += refresh_after(control, model_name, opts.dataset)  # the dataset's QGIS project
    return report


def _resolve_overlap(opts: PredictOptions, p: Predictor) -> PredictOptions:
    """``opts`` with the overlap the model's window allows (default: 32, at most a quarter)."""
    overlap = opts.overlap
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, int(p.tile_px) // 4)
    if not 0 <= overlap < int(p.tile_px):
        raise errors.ConfigError(f"overlap must be 0..{int(p.tile_px) - 1} pixels "
                                 f"(model windows are {p.tile_px} px), not {overlap}")
    return replace(opts, overlap=overlap)


def _run_params(opts: PredictOptions, names: OutputNames, p: Predictor) -> dict[str, Any]:
    """The run's ``params`` in ``pggeolearn.runs``."""
    return {"extent": list(opts.extent) if opts.extent is not None else None, "extent_srid": opts.extent_srid,
            "dataset": opts.dataset, "split": opts.split if opts.dataset else None, "imagery": opts.imagery,
            "out": names.show(names.out), "overlap": opts.overlap, "stitch": opts.stitch,
            "probabilities": opts.probabilities, "vectorize": opts.vectorize, "tile_px": opts.tile_px,
            "min_pixels": opts.min_pixels, "grid_origin": list(opts.grid_origin) if opts.grid_origin else None,
            "batch_size": opts.batch_size, "overwrite": opts.overwrite, "append": opts.append,
            "framework": str(getattr(p, "framework", "")), "window": int(p.tile_px), "tta": opts.tta}


def _execute(dsn: str | None, plan: Plan, names: OutputNames, report: PredictReport, opts: PredictOptions,
             started: float) -> None:
    p, g = plan.predictor, plan.grid
    st = Stitcher(g.width, g.height, window=int(p.tile_px), overlap=opts.overlap, mode=opts.stitch,
                  n_classes=len(p.classes), tile_px=plan.tile_px)
    needed_w = needed_windows(st, plan.needed_tiles, plan.tile_px)
    report.windows = int(needed_w.sum())
    with connect(dsn, application_name="pggeolearn predict writer") as w:
        with w.transaction():
            report.notes += create_schemas(w, names)
            writer = Writer(w, plan, report.run_id, probabilities=opts.probabilities, vectorize=opts.vectorize,
                            min_pixels=opts.min_pixels)
            writer.create(names.out[0])
            reader = BandReader(dsn, plan.imagery, g, st, p, needed_w.any(axis=1).tolist(), opts.timeout_s).start()
            try:
                predict_s, wait_s, stitch_s = _predict_windows(st, needed_w, reader, writer, p, report, opts)
            finally:
                reader.close()
            report.tiles, report.tiles_empty = writer.tiles, writer.empty
            if writer.tiles == 0:
                raise errors.NotFound(f"no imagery under the extent from {plan.imagery.label}: "
                                      "nothing predicted, nothing written")
            t2 = time.perf_counter()
            if names.polygons:
                report.pieces = writer.pieces.count
                report.min_pixels = opts.min_pixels
                report.dropped = writer.pieces.dropped
            report.overviews, report.polygons = writer.finish(names, append=opts.append, overviews=opts.overviews,
                                                              model_name=report.model)
            report.appended = opts.append
            finalize_s = time.perf_counter() - t2
            report.timing = {"read": reader.seconds, "read wait": wait_s, "predict": predict_s,
                             "stitch": stitch_s, "write": writer.write_s, "vectorize": writer.vector_s,
                             "finalize": finalize_s}
            report.seconds = time.perf_counter() - started
            runs.finish(w, report.run_id, report.outputs())


def _predict_windows(st: Stitcher, needed_w: np.ndarray, reader: BandReader, writer: Writer, p: Predictor,
                     report: PredictReport, opts: PredictOptions) -> tuple[float, float, float]:
    """Every needed window through the model, row band by row band, each finished tile row to
    the writer: (seconds in the model, seconds waiting for imagery, seconds stitching)."""
    n_classes = len(p.classes)
    predict_s = wait_s = stitch_s = 0.0
    bar = tqdm(total=report.windows, unit="window", desc=f"predict {report.out}",
               disable=not opts.progress, leave=False)
    try:
        S, P = st.stride, st.window
        for r in range(st.nrows):
            t0 = time.perf_counter()
            band = reader.get()
            wait_s += time.perf_counter() - t0
            if band is not None:
                img, valid = band
                cols = [c for c in range(st.ncols) if needed_w[r, c]]
                live = [c for c in cols if valid[:, c * S:c * S + P].any()]
                bar.update(len(cols) - len(live))
                for k in range(0, len(live), opts.batch_size):
                    chunk = live[k:k + opts.batch_size]
                    x = np.ascontiguousarray(np.stack([img[:, :, c * S:c * S + P] for c in chunk]))
                    t1 = time.perf_counter()
                    y = call_model(p, x, n_classes)
                    t2 = time.perf_counter()
                    predict_s += t2 - t1
                    for c, probs in zip(chunk, y, strict=True):
                        st.add(r, c, probs, valid[:, c * S:c * S + P])
                    stitch_s += time.perf_counter() - t2
                    report.windows_predicted += len(chunk)
                    bar.update(len(chunk))
            t3 = time.perf_counter()
            for row0, probs, valid_rows in st.finish_row(r):
                stitch_s += time.perf_counter() - t3
                writer.tile_row(row0, probs, valid_rows)
                t3 = time.perf_counter()
            stitch_s += time.perf_counter() - t3
    finally:
        bar.close()
    return predict_s, wait_s, stitch_s
