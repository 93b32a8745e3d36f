"""Peer comparison with TorchGeo: image + label chips of the same Banepa tiles per second,
pggeolearn's torch loader against TorchGeo's RasterDataset & VectorDataset, side by side.

Run: ``python benchmarks/bench_torchgeo.py [--dsn DSN] [--samples 192] [--epochs 2] [--batch 32]
[--workers 0 2]`` (11 minutes on 2 cores with half a core free, nearly all of it TorchGeo's
side; creating the venv downloads a few hundred MB of wheels the first time).

The data: the Banepa train mosaic (``imagery/banepa_train_mosaic_epsg3857.tif``, 3072 x 4096 px
RGB, JPEG-compressed GeoTIFF, 0.149 m) and the OSM buildings (``labels/*.geojson``, EPSG:4326)
from ``SHARED_DATA/banepa`` (skipped with a message when absent). The mosaic's grid has 192
tiles of 256 x 256 px (12 x 16); each side delivers ``--samples`` of them per epoch (all 192
by default) as batches of ``--batch``:

* **ours**: the mosaic and buildings imported into a scratch PostGIS database and cut into the
  demo's dataset (``demo.load_banepa`` + ``demo.recipe`` + ``chips.build``, as bench_train.py
  builds it), every usable chip put in the train split (ratios 1/0/0, no guard band) so the
  whole grid streams; then ``pggeolearn.torch.make_loader``: uint8 image ``(N, 3, 256, 256)``,
  uint8 label ``(N, 256, 256)`` and the valid mask, shuffled, ``--samples`` chips per epoch;
  and once more as float32 normalized images (``dtype='float32'``). The one-off import and chip
  build are timed apart (the counterpart of TorchGeo's index build).
* **TorchGeo**: ``RasterDataset(mosaic) & VectorDataset(geojson)`` (the labels rasterized on the
  fly, buildings = 1) with a ``GridGeoSampler`` (256 px, stride 256) and a ``DataLoader`` with
  ``stack_samples``: float32 image ``(N, 3, 256, 256)`` and int64 mask ``(N, 256, 256)``, the
  first ``--samples`` cells in grid order (neighbours in a row: kind to its reads). A second
  row reads the images alone (``RasterDataset`` only) to show what the labels cost. It runs in
  its own venv (TorchGeo >= 0.9 needs Python >= 3.12), a subprocess of this script printing JSON.

Each side runs ``--epochs`` epochs per DataLoader worker count (``--workers``, the same counts
for both; workers persist across epochs); epoch 1 is cold (files, caches, worker start), epoch
2 warm. The ratio is ours / TorchGeo at the same worker count.

The TorchGeo venv: created once under ``~/.cache/pggeolearn/`` (``$XDG_CACHE_HOME``) and
reused. It tries, in order: Python >= 3.12 with the newest TorchGeo and the CPU build of torch
(``torch==2.13.0+cpu``); the same with PyPI's torch (``torch==2.13.0``, a CUDA build: about
5 GB of venv with its nvidia-* packages, still run on the CPU here; the script says so before it
downloads); then Python 3.11 with TorchGeo 0.8.x (the last release for 3.11) and the CPU torch.
``$PGGEOLEARN_TORCH_SPEC`` replaces every torch requirement. PyPI's torchvision is a
CUDA build too: where its C++ ops do not load beside the CPU torch, the child declares the two
op schemas torchvision 0.28 needs at import (no kernels; TorchGeo's datasets and samplers use
no torchvision op) and the script prints that it did. ``--no-fallback`` insists on
Python >= 3.12. A failed install is remembered (``--retry-install`` tries again). Where no
TorchGeo can be installed the script prints why on one line and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TILE = 256
MOSAIC = "imagery/banepa_train_mosaic_epsg3857.tif"
CPU_TORCH, PYPI_TORCH = "torch==2.13.0+cpu", "torch==2.13.0"
# (minimum Python, TorchGeo requirement, torch requirement): the newest TorchGeo first (with the
# CPU torch, else PyPI's CUDA build), then the last TorchGeo for 3.11
FLAVOURS = [((3, 12), "torchgeo", CPU_TORCH), ((3, 12), "torchgeo", PYPI_TORCH),
            ((3, 11), "torchgeo<0.9", CPU_TORCH)]
INSTALL_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------ the TorchGeo venv


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pggeolearn"


def python_version(exe: str) -> tuple[int, int] | None:
    """``(major, minor)`` of an interpreter that really runs (a pyenv shim may not), else None."""
    try:
        out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.split()
    return (int(parts[0]), int(parts[1])) if out.returncode == 0 and len(parts) == 2 else None


def find_pythons() -> dict[tuple[int, int], str]:
    """Working interpreters >= 3.11 by version: on PATH (python3.N) and in pyenv's versions."""
    candidates = [shutil.which(f"python3.{m}") for m in range(20, 10, -1)]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates += sorted(str(p) for p in pyenv.glob("3.*/bin/python3"))
    found: dict[tuple[int, int], str] = {}
    for exe in filter(None, candidates):
        v = python_version(exe)
        if v and v >= (3, 11) and v not in found:
            found[v] = exe
    return found


def ensure_venv(python: str, version: tuple[int, int], requirement: str, torch_spec: str,
                retry: bool) -> tuple[Path | None, str]:
    """A venv with ``requirement`` and ``torch_spec``, created once: ``(its python, '')`` or
    ``(None, why not)``. Outcomes are remembered in the venv folder (``.ready``/``.failed``)."""
    spec = os.environ.get("PGGEOLEARN_TORCH_SPEC", torch_spec)
    flavour = "" if spec == CPU_TORCH else "-" + spec.replace("=", "").replace("+", "")
    venv = cache_dir() / f"torchgeo-venv-py{version[0]}.{version[1]}{flavour}"
    ready, failed = venv / ".ready", venv / ".failed"
    if ready.exists():
        return venv / "bin" / "python", ""
    if failed.exists() and not retry:
        return None, failed.read_text().strip() + " (remembered; --retry-install tries again)"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    size = ("about 5 GB of wheels (PyPI's torch is a CUDA build; it runs on the CPU here)"
            if spec == PYPI_TORCH else "a few hundred MB of wheels")
    print(f"creating {venv} (Python {version[0]}.{version[1]}: {spec}, {requirement}); "
          f"the first time this downloads {size}", flush=True)
    py = str(venv / "bin" / "python")
    steps = [([python, "-m", "venv", str(venv)], "creating the venv failed"),
             ([py, "-m", "pip", "install", "--quiet", spec],
              f"no {spec} wheel for it on the package indexes configured here (PyPI's Linux "
              "torch wheels are CUDA builds; add the PyTorch CPU wheel index with "
              "PIP_EXTRA_INDEX_URL, or set PGGEOLEARN_TORCH_SPEC)"),
             # TorchGeo 0.8 imports requests without declaring it
             ([py, "-m", "pip", "install", "--quiet", spec, requirement, "requests"],
              f"installing {requirement} failed"),
             ([py, __file__, "--torchgeo-check"], "TorchGeo does not import")]
    for cmd, meaning in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            code, text = out.returncode, out.stdout + out.stderr
        except subprocess.TimeoutExpired:
            code, text = -1, f"timed out after {INSTALL_TIMEOUT_S} s"
        if code != 0:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()
                     and not ln.startswith("WARNING: Location")]
            detail = "" if "ResolutionImpossible" in text else f" ({(lines or ['?'])[-1][:160]})"
            why = f"Python {version[0]}.{version[1]}: {meaning}{detail}"
            failed.write_text(why + "\n")
            return None, why
    ready.write_text(out.stdout)
    return venv / "bin" / "python", ""


def merged(notes: list[str]) -> list[str]:
    """``Python 3.13: why`` and ``Python 3.12: why`` (the same why) as ``Python 3.13, 3.12: why``."""
    out: dict[str, list[str]] = {}
    for note in notes:
        head, _, why = note.partition(": ")
        out.setdefault(why, []).append(head.removeprefix("Python "))
    return [f"Python {', '.join(heads)}: {why}" for why, heads in out.items()]


def torchgeo_python(fallback: bool, retry: bool) -> tuple[Path | None, list[str]]:
    """The first TorchGeo venv that installs, and why each one before it did not."""
    pythons, notes = find_pythons(), []
    for minimum, requirement, torch_spec in FLAVOURS if fallback else FLAVOURS[:2]:
        exact = minimum == (3, 11)  # TorchGeo 0.8.x: Python 3.11 exactly (3.12 takes the newest)
        usable = sorted((v for v in pythons if (v == minimum if exact else v >= minimum)), reverse=True)
        if not usable:
            notes.append(f"no Python {minimum[0]}.{minimum[1]}{'' if exact else '+'} interpreter found "
                         f"(looked on PATH and in pyenv)")
            continue
        for v in usable:
            exe, why = ensure_venv(pythons[v], v, requirement, torch_spec, retry)
            if exe:
                return exe, notes
            notes.append(why)
    return None, notes


# ------------------------------------------------------------------------------ TorchGeo (child)


_KEEP: list = []  # the torch.library.Library below lives as long as the process


def torchvision_ops_note() -> str:
    """Make torchvision importable where its C++ ops cannot load; say so ('' when they load).

    The only torchvision for torch 2.13 on PyPI is a CUDA build: beside a CPU torch its ``_C``
    does not load, and torchvision then runs in its own ops-less mode (each op raises its
    "Couldn't load custom C++ ops") except that 0.28 registers fake kernels for ``nms`` and
    ``qnms`` without that guard. Those two schemas are declared here, with no kernel, so the
    import succeeds; TorchGeo's raster and vector datasets and samplers use no torchvision op."""
    import importlib.util

    import torch

    folder = Path(importlib.util.find_spec("torchvision").submodule_search_locations[0])
    lib = next(folder.glob("_C*.so"), None)
    try:
        torch.ops.load_library(str(lib))
        return ""
    except (OSError, TypeError) as e:
        reason = str(e).splitlines()[0][:120]
    declared = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(declared)
    return (f"torchvision's C++ ops do not load here ({reason}); it runs without them "
            "(nms/qnms declared without kernels); TorchGeo's datasets and samplers use none")


def torchgeo_versions() -> dict:
    """Import TorchGeo's datasets and samplers (the install check) and report versions."""
    note = torchvision_ops_note()
    import rasterio
    import torch
    import torchgeo
    import torchgeo.datasets
    import torchgeo.samplers
    import torchvision

    return {"torchgeo": torchgeo.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": "{}.{}".format(*sys.version_info[:2]),
            "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "note": note}


def torchgeo_child(spec: dict) -> dict:
    """Run in the TorchGeo venv: samples/s per worker count and epoch, as a dict."""
    out = torchgeo_versions()
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, VectorDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    t0 = time.perf_counter()
    image = RasterDataset(paths=[spec["mosaic"]])
    labels = VectorDataset(paths=[spec["labels"]], crs=image.crs, res=image.res)
    both = image & labels
    out.update(index_s=time.perf_counter() - t0, rows=[])
    for what, ds in (("image+label", both), ("image", image)):
        queries = list(GridGeoSampler(ds, size=spec["tile"], stride=spec["tile"]))
        queries = queries[:spec["samples"]]
        for workers in spec["workers"]:
            loader = DataLoader(ds, batch_size=spec["batch"], sampler=queries, collate_fn=stack_samples,
                                num_workers=workers, persistent_workers=workers > 0)
            rates, delivers = [], ""
            for _ in range(spec["epochs"]):
                t, n = time.perf_counter(), 0
                for batch in loader:
                    n += len(batch["image"])
                    delivers = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')} "
                                         f"{tuple(v.shape[1:])}" for k, v in batch.items()
                                         if isinstance(v, torch.Tensor))
                rates.append(n / (time.perf_counter() - t))
            del loader
            out["rows"].append({"what": what, "workers": workers, "samples": n, "rates": rates,
                                "delivers": delivers})
    return out


def run_torchgeo(python: Path, spec: dict) -> dict:
    proc = subprocess.run([str(python), __file__, "--torchgeo-child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the TorchGeo side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ ours


def build_chips(dsn: str, data: Path) -> dict:
    """The demo's Banepa dataset, every usable chip in train: import and build seconds, chips."""
    from pggeolearn import chips, datasets, demo
    from pggeolearn.db.connect import connect

    with connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        image_table, _, label_sql, classes, resolution = demo.load_banepa(conn, data)
        t1 = time.perf_counter()
        datasets.create(conn, demo.recipe("banepa", image_table, label_sql, classes, resolution))
        report = chips.build(conn, "banepa", jobs=2, progress=False)
        chips.assign_splits(conn, "banepa", ratios=(1.0, 0.0, 0.0), guard_m=0)
        t2 = time.perf_counter()
        n = conn.execute("SELECT count(*) FROM pggeolearn.chips WHERE dataset = 'banepa' "
                         "AND split = 'train'").fetchone()[0]
    return {"import_s": t1 - t0, "build_s": t2 - t1, "chips": n, "tiles": report.tiles}


def run_ours(dsn: str, batch: int, samples: int, epochs: int, workers: list[int]) -> list[dict]:
    """Samples/s per epoch of the torch loader: uint8 batches at each worker count, then
    float32 normalized ones (``dtype='float32'``, TorchGeo's image dtype) at the first."""
    from pggeolearn.torch import make_loader

    rows = []
    for w, kwargs in [(w, {}) for w in workers] + [(workers[0], {"dtype": "float32"})]:
        loader = make_loader(dsn, "banepa", "train", batch_size=batch, num_workers=w,
                             persistent_workers=w > 0, max_batches=math.ceil(samples / batch),
                             **kwargs)
        rates, delivers = [], ""
        for _ in range(epochs):
            t, n = time.perf_counter(), 0
            for b in loader:
                n += min(batch - b["pad"], samples - n)
                delivers = ", ".join(f"{k} {str(b[k].dtype).replace('torch.', '')} "
                                     f"{tuple(b[k].shape[1:])}" for k in ("image", "label", "valid"))
            rates.append(n / (time.perf_counter() - t))
        del loader
        rows.append({"workers": w, "samples": n, "rates": rates, "delivers": delivers,
                     "what": "float32" if kwargs else "uint8"})
    return rows


# ------------------------------------------------------------------------------ main


def table(ours: list[dict], theirs: dict, epochs: int, batch: int) -> None:
    from _common import print_table

    by_w = {r["workers"]: r for r in theirs["rows"] if r["what"] == "image+label"}
    head = ["loader", "workers", "samples"] + [f"epoch {e + 1} samples/s" for e in range(epochs)]
    head += [f"ours/TorchGeo epoch {e + 1}" for e in range(epochs)]
    rows = []
    for r in ours:
        ref = by_w.get(r["workers"])
        ratios = [f"{a / b:.1f}x" if ref else "-" for a, b in zip(r["rates"], ref["rates"] if ref
                                                                     else r["rates"], strict=True)]
        name = ("pggeolearn torch loader (chip store)" if r["what"] == "uint8"
                else "pggeolearn torch loader, float32 normalized")
        rows.append([name, r["workers"], r["samples"]]
                    + [f"{v:,.1f}" for v in r["rates"]] + ratios)
    tg = f"TorchGeo {theirs['torchgeo']}"
    for r in theirs["rows"]:
        name = (f"{tg} Raster & VectorDataset, GridGeoSampler" if r["what"] == "image+label"
                else f"{tg} RasterDataset only (no labels)")
        rows.append([name, r["workers"], r["samples"]] + [f"{v:,.1f}" for v in r["rates"]]
                    + ["" for _ in range(epochs)])
    print_table(f"Banepa train mosaic, {TILE} x {TILE} px tiles, batches of {batch}, CPU "
                f"(ours: Python {sys.version_info[0]}.{sys.version_info[1]}; TorchGeo: Python "
                f"{theirs['python']}, torch {theirs['torch']}, GDAL {theirs['gdal']})",
                head, rows)
    tg_delivers = next(r["delivers"] for r in theirs["rows"] if r["what"] == "image+label")
    for what in ("uint8", "float32"):
        print(f"ours ({what}) delivers: {next(r['delivers'] for r in ours if r['what'] == what)} "
              "per sample (+ tile_id, transform, srid)")
    print(f"TorchGeo delivers: {tg_delivers} per sample (+ bounds, crs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", help="server for the scratch database (default: a temporary "
                                  "embedded cluster, or PGGEOLEARN_BENCH_DSN)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=192,
                    help="samples per epoch on both sides (default and most: the 192 chips)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="DataLoader worker counts, the same for both sides")
    ap.add_argument("--no-fallback", action="store_true",
                    help="only Python >= 3.12 and the newest TorchGeo, no 3.11 / 0.8.x")
    ap.add_argument("--retry-install", action="store_true",
                    help="try again to install a TorchGeo venv that failed before")
    ap.add_argument("--torchgeo-child", help=argparse.SUPPRESS)
    ap.add_argument("--torchgeo-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torchgeo_check:
        print(json.dumps(torchgeo_versions()))
        return
    if args.torchgeo_child:
        print(json.dumps(torchgeo_child(json.loads(args.torchgeo_child))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from _common import SHARED_DATA, conditions, scratch_database

    data = SHARED_DATA / "banepa"
    labels = sorted((data / "labels").glob("*.geojson")) if (data / "labels").is_dir() else []
    if not (data / MOSAIC).exists() or not labels:
        print(f"skipped: the Banepa data is not at {data} (set PGGEOLEARN_DATA)")
        return
    python, notes = torchgeo_python(not args.no_fallback, args.retry_install)
    if python is None:
        print(f"skipped: no TorchGeo could be installed here: {'; '.join(merged(notes))}")
        return
    for note in merged(notes):
        print(f"TorchGeo venv: {note}")
    print(conditions())
    with scratch_database(args.dsn) as dsn:
        built = build_chips(dsn, data)
        print(f"ours, one-off: import (mosaics + buildings) {built['import_s']:.1f} s, chips build "
              f"+ split {built['build_s']:.1f} s: {built['chips']} chips of {built['tiles']} tiles")
        samples = min(args.samples, built["chips"])
        ours = run_ours(dsn, args.batch, samples, args.epochs, args.workers)
    spec = {"mosaic": str(data / MOSAIC), "labels": str(labels[0]), "tile": TILE,
            "batch": args.batch, "samples": samples, "epochs": args.epochs, "workers": args.workers}
    theirs = run_torchgeo(python, spec)
    if theirs["note"]:
        print(f"TorchGeo venv: {theirs['note']}")
    print(f"TorchGeo, one-off: index build (RasterDataset & VectorDataset) {theirs['index_s']:.1f} s")
    table(ours, theirs, args.epochs, args.batch)
    print(conditions())


if __name__ == "__main__":
    main()
