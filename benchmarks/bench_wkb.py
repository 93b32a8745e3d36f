"""Benchmark pggeolearn.wkb against a naive per-row raster WKB parser.

Run: ``python benchmarks/bench_wkb.py`` (about 15-25 s). Tiles are 3 x 256 x 256 uint8
(8BUI), the usual RGB chip; N = 20000 tiles built from a few distinct encoded buffers (so
the source bytes are cache-warm, as they are when a batch was just fetched).

With glibc's default malloc the baseline's batch rows are dominated by page faults (its
many ~64-200 KB temporaries make malloc trim and re-grow the heap); run with
``MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000`` for an
allocator-neutral comparison.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import conditions  # noqa: E402

from pggeolearn import wkb  # noqa: E402

N = 20_000
BATCH = 32
BANDS, SIZE = 3, 256
DISTINCT = 8
GT = (500000.0, 0.5, 0.0, 3100000.0, 0.0, -0.5)


# ------------------------------------------------------------------ BASELINE (naive)
# What a typical per-row Python parser does: struct.unpack the header, walk the bands,
# np.frombuffer(...).copy() each band, np.stack them. Only 8BUI/NDR is handled.

_BASE_HDR = struct.Struct("<BHHddddddiHH")


def baseline_decode(buf: bytes) -> dict:
    (_, _, nbands, sx, sy, ipx, ipy, kx, ky, srid, width, height) = _BASE_HDR.unpack(buf[:61])
    pos, bands, nodata = 61, [], []
    for _ in range(nbands):
        flags = buf[pos]
        nodata.append(buf[pos + 1] if flags & 0x40 else None)
        pos += 2
        n = width * height
        bands.append(np.frombuffer(buf[pos : pos + n], np.uint8).copy().reshape(height, width))
        pos += n
    return {
        "data": np.stack(bands),
        "geotransform": (ipx, sx, kx, ipy, ky, sy),
        "srid": srid,
        "nodata": nodata,
    }


def baseline_encode(data: np.ndarray, geotransform: tuple, srid: int) -> bytes:
    nbands, height, width = data.shape
    ipx, sx, kx, ipy, ky, sy = geotransform
    out = _BASE_HDR.pack(1, 0, nbands, sx, sy, ipx, ipy, kx, ky, srid, width, height)
    for i in range(nbands):
        out += bytes((4, 0)) + data[i].astype(np.uint8).tobytes()
    return out


# ------------------------------------------------------------------ harness


def best_of(fn: Callable[[], None], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    print(conditions())  # commit, cores, cores free, load: beside every table
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (BANDS, SIZE, SIZE), dtype=np.uint8) for _ in range(DISTINCT)]
    distinct = [wkb.encode(wkb.from_array(a, geotransform=GT, srid=32645)) for a in arrays]
    bufs = [distinct[i % DISTINCT] for i in range(N)]
    tile_bytes = len(distinct[0])
    assert all(np.array_equal(baseline_decode(b)["data"], wkb.decode(b).data) for b in distinct)
    assert baseline_encode(arrays[0], GT, 32645) == distinct[0]
    assert np.array_equal(wkb.decode_many(distinct), np.stack(arrays))
    batches = [bufs[i : i + BATCH] for i in range(0, N, BATCH)]

    def ours_decode() -> None:
        for b in bufs:
            wkb.decode(b)

    def base_decode() -> None:
        for b in bufs:
            baseline_decode(b)

    def ours_copy() -> None:
        for b in bufs:
            wkb.decode(b, copy=True)

    def ours_stack() -> None:
        for batch in batches:
            np.stack([wkb.decode(b).data for b in batch])

    def ours_many() -> None:
        for batch in batches:
            wkb.decode_many(batch)

    def base_stack() -> None:
        for batch in batches:
            np.stack([baseline_decode(b)["data"] for b in batch])

    n_enc = N // 4
    tiles = [wkb.decode(b) for b in distinct]
    enc_src = [tiles[i % DISTINCT] for i in range(n_enc)]

    def ours_encode() -> None:
        for t in enc_src:
            wkb.encode(t)

    def base_encode() -> None:
        for t in enc_src:
            baseline_encode(t.data, t.geotransform, t.srid)

    rows = [
        ("decode (zero-copy view)", N, ours_decode, base_decode),
        ("decode(copy=True)", N, ours_copy, base_decode),
        (f"decode + np.stack (batch {BATCH})", N, ours_stack, base_stack),
        (f"decode_many (batch {BATCH})", N, ours_many, base_stack),
        ("encode", n_enc, ours_encode, base_encode),
    ]
    print(f"pggeolearn.wkb benchmark: {BANDS}x{SIZE}x{SIZE} 8BUI tiles, "
          f"{tile_bytes} bytes each, numpy {np.__version__}, best of 3")  # fmt: skip
    print("baseline = naive parser: struct.unpack + np.frombuffer(...).copy() per band "
          "+ np.stack (encode: bytes += per band)")  # fmt: skip
    print("(batch rows: see the module docstring about glibc malloc and the baseline)")
    print()
    head = (f"{'operation':<28} {'tiles':>6} {'ours tiles/s':>13} {'ours MB/s':>10} "
            f"{'base tiles/s':>13} {'base MB/s':>10} {'ours/baseline':>14}")  # fmt: skip
    print(head)
    print("-" * len(head))
    timings: dict[Callable[[], None], float] = {}
    for name, n, ours, base in rows:
        for fn in (ours, base):
            if fn not in timings:  # the slow baseline rows are shared: time them once
                timings[fn] = best_of(fn)
        t_ours, t_base = timings[ours], timings[base]
        r_ours, r_base = n / t_ours, n / t_base
        mb = tile_bytes / 1e6
        print(f"{name:<28} {n:>6} {r_ours:>13,.0f} {r_ours * mb:>10,.0f} "
              f"{r_base:>13,.0f} {r_base * mb:>10,.0f} {r_ours / r_base:>13.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
