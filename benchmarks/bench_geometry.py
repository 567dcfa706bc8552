"""Benchmark: grid-accelerated PMT look-up (Detector.pmt_intersect) in photon rays per second.

For each detector, 1e6 rays (uniform interior points, isotropic directions; float32) are traced to the
first PMT disk (or the wall). Reports the look-up-table build time, the rays/s of pmt_intersect (best of
``--repeat``), the fraction of rays sent to the all-PMT fallback, the PMT hit fraction and the table width K.
Writes benchmarks/results/geometry.json atomically.

    python benchmarks/bench_geometry.py [--n 1000000] [--device cpu|cuda] [--detectors wcte sk]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import atomic_write_json  # noqa: E402
from physics.geometry import Detector  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name: str, n: int, device: str, repeat: int) -> dict:
    det = Detector.load(name).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    pos = det.sample_fiducial(n, g, margin=0.0)
    d = torch.randn(n, 3, generator=g, device=device)
    d = d / d.norm(dim=1, keepdim=True)
    wall, _ = det.wall_intersect(pos, d)
    t0 = time.perf_counter()
    table = det._table(torch.device(device))
    _sync(device)
    t_build = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        pmt, _, _ = det.pmt_intersect(pos, d, wall)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    row = {
        "detector": name,
        "n_pmts": det.n_pmts,
        "n_rays": n,
        "table_cells": int(table.shape[0]),
        "table_K": int(table.shape[1]),
        "table_build_s": round(t_build, 4),
        "pmt_intersect_s": round(best, 4),
        "rays_per_s": round(n / best, 1),
        "fallback_fraction": det.last_fallback_fraction,
        "hit_fraction": float((pmt >= 0).float().mean()),
        "photocoverage": det.photocoverage,
    }
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--detectors", nargs="+", default=["wcte", "sk"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "geometry.json"))
    a = ap.parse_args()
    rows = [bench(name, a.n, a.device, a.repeat) for name in a.detectors]
    out = {
        "benchmark": "geometry.pmt_intersect",
        "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
        "results": rows,
    }
    print(f"wrote {atomic_write_json(a.out, out)}")


if __name__ == "__main__":
    main()
