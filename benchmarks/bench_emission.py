"""Emission throughput: Cherenkov photons generated per second for a 1 GeV muon and a 1 GeV electron shower.

Usage: python benchmarks/bench_emission.py [--device cpu|cuda] [--events N]
Writes benchmarks/results/emission.json (atomically).
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
from physics import emission as em  # noqa: E402
from physics.medium import Medium  # noqa: E402


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--events", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    dev = args.device
    medium = Medium.load("water").to(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    vtx = torch.zeros(args.events, 3, device=dev)
    d = torch.tensor([0.0, 0.0, 1.0], device=dev)
    res = {
        "device": dev,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "events": args.events,
    }
    # warm-up
    em.cherenkov_photons(em.track_steps("mu-", 300.0, vtx[:1], d, medium, gen), medium, gen)
    best = {}
    for _ in range(args.repeat):
        _sync(dev)
        t0 = time.perf_counter()
        steps = em.track_steps("mu-", 1000.0, vtx, d, medium, gen)
        _sync(dev)
        t1 = time.perf_counter()
        ph = em.cherenkov_photons(steps, medium, gen)
        _sync(dev)
        t2 = time.perf_counter()
        sh = em.shower_photons("e-", 1000.0, vtx, d, medium, gen)
        _sync(dev)
        t3 = time.perf_counter()
        cur = {
            "muon_1gev": {
                "photons_per_event": len(ph) / args.events,
                "steps_per_event": len(steps) / args.events,
                "tracking_s_per_event": (t1 - t0) / args.events,
                "photons_per_s": len(ph) / (t2 - t0),
                "photon_sampling_only_per_s": len(ph) / (t2 - t1),
            },
            "electron_1gev": {
                "photons_per_event": len(sh) / args.events,
                "photons_per_s": len(sh) / (t3 - t2),
            },
        }
        if not best or cur["muon_1gev"]["photons_per_s"] > best["muon_1gev"]["photons_per_s"]:
            best = cur
    res.update(best)
    print(json.dumps(res, indent=1))
    atomic_write_json(Path(__file__).resolve().parent / "results" / "emission.json", res)


if __name__ == "__main__":
    main()
