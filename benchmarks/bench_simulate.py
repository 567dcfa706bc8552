"""Full-chain MC speed: emission → optics → sensors → hits → waveforms, per event.

Issue target: a 1 GeV muon in the SK-like detector, hits and waveforms included, in under 1 s on the
2-core CPU. Usage: ``python benchmarks/bench_simulate.py [--device cuda] [--events 5]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without an installed package too
from benchmarks._util import write_json  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402


def time_chain(detector: str, particle: str, energy: float, events: int, device: str) -> dict:
    cfg = SimConfig(
        detector=detector,
        particle=particle,
        energy=energy,
        vertex=[0.0, 0.0, 0.0],
        direction=[1.0, 0.0, 0.0],
        waveforms=True,
    )
    sim = Simulator(cfg, device=device)
    sim.run(1, seed=123, batch_size=1)  # warm-up (allocations, lookup tables)
    times, hits, pe = [], [], []
    for i in range(events):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sim.run(1, seed=i, batch_size=1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        hits.append(len(res["hits"]))
        pe.append(float(res["hits"].charge.sum()))
    return {
        "detector": detector,
        "particle": particle,
        "energy_mev": energy,
        "events": events,
        "s_per_event_mean": sum(times) / events,
        "s_per_event_min": min(times),
        "hit_pmts_per_event": sum(hits) / events,
        "pe_per_event": sum(pe) / events,
        "waveforms": True,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--events", type=int, default=5)
    a = ap.parse_args()
    rows = [
        time_chain("sk", "mu-", 1000.0, a.events, a.device),
        time_chain("wcte", "mu-", 500.0, a.events, a.device),
        time_chain("sk", "e-", 1000.0, a.events, a.device),
    ]
    target = "SK-like 1 GeV muon with hits+waveforms < 1 s"
    write_json(f"simulate_{a.device}", {"target": target, "rows": rows})


if __name__ == "__main__":
    main()
