"""photonfit vs Geant4 on the tracked-photon reference event (shared/reference/geant4/mu500_tracked.h5).

The Geant4 run: 500 MeV mu- from (1, -0.5, -2) m along (0.3, 0.2, 0.933) in water (n(lambda) table,
absorption 30 m, Rayleigh 60 m), every Cherenkov photon tracked to the black wall of a cylinder r = 5 m,
half-height 5 m: 1.44 s CPU per event on this 2-core machine (README of the reference; per-event cpu_s in the
file averages 1.443 s, copied into tests/data/g4_tracked.json).

Here the same event is simulated with photonfit: emission (track_steps + cherenkov_photons, Frank-Tamm,
~62k photons) and optics to the bare wall (Optics.sample, record_wall=True, use_pmts=False, Cherenkov
polarisation from the muon direction) in the same medium and geometry. Per-event time = median over
``--events`` events simulated one at a time (as Geant4 does), after one warm-up event; a batched run of all
events at once is timed too. Ratio = 1.44 s / per-event time (target >= 50).

    python benchmarks/bench_g4_tracked.py [--device cpu|cuda] [--events 10] [--threads 1]
Writes benchmarks/results/g4_tracked.json (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import atomic_write_json  # noqa: E402
from physics.emission import cherenkov_photons, track_steps  # noqa: E402
from physics.geometry import Detector  # noqa: E402
from physics.medium import Medium  # noqa: E402
from physics.optics import Optics  # noqa: E402

G4_README_S_PER_EVENT = 1.44
REF = ROOT / "tests" / "data" / "g4_tracked.json"


def setup(device: str):
    ref = json.loads(REF.read_text())
    cfg = ref["config"]
    mcfg = copy.deepcopy(Medium.load("water").config)
    mcfg["absorption"] = {"model": "constant", "length_m": cfg["abs_length_m"]}
    mcfg["rayleigh"] = {
        "model": "power_law",
        "b_per_m": 1.0 / cfg["rayleigh_length_m"],
        "reference_nm": 500.0,
        "exponent": 0.0,
    }
    med = Medium(mcfg).to(device)
    h = cfg["half_height_m"]
    # bare wall: the Detector class needs >= 1 PMT; use_pmts=False never queries it
    det = Detector(
        "g4_cylinder",
        "cylinder",
        cfg["radius_m"],
        2 * h,
        [[0.0, 0.0, -h]],
        [[0.0, 0.0, 1.0]],
        [1e-4],
        device=device,
    )
    return ref, cfg, med, det


def simulate(
    n_ev: int, cfg: dict, med: Medium, det: Detector, opt: Optics, gen: torch.Generator, device: str
) -> tuple[int, int, float]:
    """Simulate n_ev events; returns (photons, wall hits, seconds spent in emission)."""
    t0 = time.perf_counter()
    vtx = torch.tensor(cfg["vertex_m"], device=device).expand(n_ev, 3)
    d = torch.tensor(cfg["direction"], dtype=torch.float64, device=device)
    d = (d / d.norm()).float().expand(n_ev, 3)
    steps = track_steps(cfg["particle"], cfg["energy_mev"], vtx, d, med, gen)
    ph, pol = cherenkov_photons(steps, med, gen, with_polarization=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_emit = time.perf_counter() - t0
    _, wall = opt.sample(ph, det, med, gen, record_wall=True, use_pmts=False, polarization=pol)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(ph), len(wall), t_emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--events", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "g4_tracked.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ref, cfg, med, det = setup(a.device)
    opt = Optics(wall_reflectivity=0.0).to(a.device)
    gen = torch.Generator(a.device).manual_seed(0)
    simulate(1, cfg, med, det, opt, gen, a.device)  # warm-up
    times, t_emit, n_ph, n_wall = [], [], [], []
    for _ in range(a.events):
        t0 = time.perf_counter()
        p, w, te = simulate(1, cfg, med, det, opt, gen, a.device)
        times.append(time.perf_counter() - t0)
        t_emit.append(te)
        n_ph.append(p)
        n_wall.append(w)
    t0 = time.perf_counter()
    simulate(a.events, cfg, med, det, opt, gen, a.device)
    batched = (time.perf_counter() - t0) / a.events
    per_event = statistics.median(times)
    g4_file = ref.get("geant4_cpu_s_per_event", {}).get("mean")
    out = dict(
        benchmark="g4_tracked",
        device=a.device,
        torch_threads=torch.get_num_threads(),
        load_average=os.getloadavg(),
        events=a.events,
        seconds_per_event_median=per_event,
        seconds_per_event_all=times,
        seconds_per_event_batched=batched,
        seconds_emission_median=statistics.median(t_emit),
        seconds_optics_median=statistics.median([t - e for t, e in zip(times, t_emit, strict=True)]),
        photons_per_event=statistics.mean(n_ph),
        wall_hits_per_event=statistics.mean(n_wall),
        geant4_photons_per_event=statistics.mean(ref["wall_fraction"]["n_photons"]),
        geant4_wall_hits_per_event=statistics.mean(ref["wall_fraction"]["n_hits"]),
        geant4_s_per_event_readme=G4_README_S_PER_EVENT,
        geant4_cpu_s_per_event_file=g4_file,
        speedup_vs_geant4=G4_README_S_PER_EVENT / per_event,
        speedup_vs_geant4_batched=G4_README_S_PER_EVENT / batched,
        target_speedup=50.0,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    print(
        f"photonfit {a.device}: {per_event * 1e3:.1f} ms/event (median of {a.events}: emission "
        f"{out['seconds_emission_median'] * 1e3:.1f} ms, "
        f"optics {out['seconds_optics_median'] * 1e3:.1f} ms; batched "
        f"{batched * 1e3:.1f} ms/event), {out['photons_per_event']:.0f} photons and "
        f"{out['wall_hits_per_event']:.0f} wall hits per event "
        f"(Geant4 {out['geant4_photons_per_event']:.0f}, "
        f"{out['geant4_wall_hits_per_event']:.0f}); Geant4 {G4_README_S_PER_EVENT} s/event -> speed-up "
        f"{out['speedup_vs_geant4']:.1f}x (batched {out['speedup_vs_geant4_batched']:.1f}x)"
    )
    print(f"wrote {atomic_write_json(a.out, out)}")


if __name__ == "__main__":
    main()
