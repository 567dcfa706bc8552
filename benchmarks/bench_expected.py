"""Benchmark: time of the expected direct-light response mu (and its gradient) per event.

Detectors 'wcte' and 'sk' (presets of physics.geometry), a 500 MeV muon, float32 and float64, CPU by default.
Prints a table and writes benchmarks/results/expected.json (atomically). Usage:
    python benchmarks/bench_expected.py [--events 4] [--repeat 2] [--device cpu] [--detectors wcte,sk]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import atomic_write_json  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from physics.geometry import Detector  # noqa: E402
from physics.medium import Medium  # noqa: E402
from physics.optics import Optics  # noqa: E402
from physics.sensors import PMTResponse  # noqa: E402


def _sensor_name(det: Detector) -> str:
    return "20inch" if float(det.pmt_radius.max()) >= 0.10 else "default"


def bench(name: str, dtype: torch.dtype, n_events: int, repeat: int, device: str, n_nodes: int) -> dict:
    det = Detector.load(name).to(device=device, dtype=dtype)
    med = Medium.load("water").to(device)
    sen = PMTResponse.load(_sensor_name(det), n_pmts=det.n_pmts).to(device)
    resp = PhysicsResponse(det, med, sen, "mu-", Optics(), n_track_nodes=n_nodes)
    g = torch.Generator(device="cpu").manual_seed(0)
    # the same events for both dtypes: drawn in float64 (uniform in the fiducial cylinder), then cast
    m = 0.5 if name == "wcte" else 2.0
    u = torch.rand(n_events, 3, generator=g, dtype=torch.float64)
    rho, phi = (det.radius - m) * torch.sqrt(u[:, 0]), 2 * torch.pi * u[:, 1]
    z = (det.height / 2 - m) * (2 * u[:, 2] - 1)
    vtx = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], 1).to(device=device, dtype=dtype)
    d = torch.randn(n_events, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    e = torch.full((n_events,), 500.0, dtype=dtype, device=device)
    ev = {"vertex": vtx, "direction": d, "energy": e}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        resp.expected(ev)  # warm-up
    fwd, bwd = [], []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = resp.expected(ev)
        sync()
        fwd.append(time.perf_counter() - t)
        v = vtx.clone().requires_grad_()
        dd = d.clone().requires_grad_()
        ee = e.clone().requires_grad_()
        sync()
        t = time.perf_counter()
        o = resp.expected({"vertex": v, "direction": dd, "energy": ee})
        (o["mu"].sum() + (o["mu"] * o["t_mean"]).sum()).backward()
        sync()
        bwd.append(time.perf_counter() - t)
    wl, _ = resp._wavelength_nodes(dtype, torch.device(device))
    return {
        "detector": name,
        "n_pmts": det.n_pmts,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "n_events": n_events,
        "n_track_nodes": n_nodes,
        "n_wavelength_nodes": int(wl.numel()),
        "mu_ms_per_event": 1e3 * min(fwd) / n_events,
        "mu_and_grad_ms_per_event": 1e3 * min(bwd) / n_events,
        "total_mu_mean": float(out["mu"].sum(1).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detectors", default="wcte,sk")
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "expected.json"))
    a = ap.parse_args()
    rows = []
    for name in a.detectors.split(","):
        for dtype in (torch.float32, torch.float64):
            r = bench(name, dtype, a.events, a.repeat, a.device, a.nodes)
            rows.append(r)
            print(
                f"{r['detector']:5s} P={r['n_pmts']:6d} {r['dtype']:8s} K={r['n_track_nodes']} "
                f"L={r['n_wavelength_nodes']}: mu {r['mu_ms_per_event']:9.1f} ms/event, "
                f"mu+grad {r['mu_and_grad_ms_per_event']:9.1f} ms/event "
                f"(total mu {r['total_mu_mean']:.0f} pe)",
                flush=True,
            )
    res = {
        "benchmark": "expected",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    print(f"wrote {atomic_write_json(a.out, res)}")


if __name__ == "__main__":
    main()
