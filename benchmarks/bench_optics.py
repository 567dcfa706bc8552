"""Benchmark of the Monte-Carlo optics stage: photon-steps per second and peak memory.

A photon-step is one transport round of one photon (Optics.last_stats['steps']). All processes are on:
absorption and Rayleigh scattering (repository water: Pope & Fry absorption, Morel Rayleigh), wall reflection
(R = 0.1, diffuse) and PMT-glass reflection (R = 0.1) with the grid-accelerated photocathode look-up.

Source ("muon-like"): Cherenkov cones along straight tracks, beta = 1: per track a random vertex in the
fiducial volume and a random direction, photons uniform along a fixed length (grouped by track and ordered
along it, as the simulator's emission delivers them), wavelength ~ 1/lambda^2 on the
medium's band (Frank-Tamm at beta = 1 up to the slow 1 - 1/n^2 factor), polar angle acos(1/n(lambda)) about
the track, uniform azimuth, t = s/c. Built in closed form so that the optics alone is timed.

Also times the detector's ray queries separately (wall_intersect / wall_distance / wall_normal, and
pmt_intersect / wall_pmt_intersect; the optics uses the one-pass wall_pmt_intersect when the detector has
it, so the wall distance then counts as PMT look-up time) to show where the time goes,
and measures the peak memory of a 1e7-photon run in a fresh subprocess (ru_maxrss, or
torch.cuda.max_memory_allocated on CUDA).

    python benchmarks/bench_optics.py [--device cpu|cuda] [--n 1e6] [--mem-n 1e7] [--threads 1]
        [--backend auto|torch|numba] [--repeat 3]
The 'numba' backend (auto on CPU) is the fused kernel of physics/transport_cpu.py: it makes no separate
ray queries, so its wall/PMT query times read 0 (all time is "optics own").
Writes benchmarks/results/optics.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import atomic_write_json  # noqa: E402
from physics.constants import C_M_PER_NS  # noqa: E402
from physics.geometry import Detector  # noqa: E402
from physics.medium import Medium  # noqa: E402
from physics.optics import Optics, orthonormal_basis  # noqa: E402
from physics.records import Photons  # noqa: E402

TRACK_M = {"wcte": 1.2, "sk": 4.0}


def muon_like_photons(
    det: Detector, med: Medium, n: int, gen: torch.Generator, device: str, per_track: int = 50_000
) -> Photons:
    """n photons (float32) from Cherenkov cones of straight beta = 1 tracks inside ``det`` (module doc)."""
    n_tr = max(1, math.ceil(n / per_track))
    length = TRACK_M.get(det.name, 0.3 * det.radius)
    margin = min(0.4 * det.radius, 0.5 * length + 0.1)
    vtx = det.sample_fiducial(n_tr, gen, margin=margin).to(device)
    u = torch.randn(n_tr, 3, generator=gen, device=device)
    u = u / u.norm(dim=1, keepdim=True)
    # photons grouped by track and ordered along it (stratified positions), as the simulator's emission
    # hands them to the optics (events in turn, steps in order)
    per = math.ceil(n / n_tr)
    i = torch.arange(n, device=device)
    tr = i // per
    s = ((i % per + torch.rand(n, generator=gen, device=device)) / per - 0.5) * length
    lo, hi = med.wl_min, med.wl_max
    r = torch.rand(n, generator=gen, device=device)
    wl = 1.0 / (1.0 / lo - r * (1.0 / lo - 1.0 / hi))  # inverse CDF of 1/lambda^2
    cos_c = 1.0 / med.refractive_index(wl.double()).float()
    sin_c = torch.sqrt(1 - cos_c**2)
    phi = 2 * math.pi * torch.rand(n, generator=gen, device=device)
    ut = u[tr]
    e1, e2 = orthonormal_basis(ut)
    d = cos_c[:, None] * ut + (sin_c * torch.cos(phi))[:, None] * e1 + (sin_c * torch.sin(phi))[:, None] * e2
    pos = vtx[tr] + s[:, None] * ut
    pos = torch.where(det.inside(pos)[:, None], pos, vtx[tr])
    return Photons(
        pos=pos,
        dir=d / d.norm(dim=1, keepdim=True),
        t=(s + 0.5 * length) / C_M_PER_NS,
        wavelength=wl,
        event=tr,
    )


class TimedDetector:
    """Forwards everything to a Detector, timing its wall (wall_intersect, wall_distance, wall_normal) and
    PMT (pmt_intersect, wall_pmt_intersect) ray queries (synchronising on CUDA)."""

    def __init__(self, det: Detector, device: str) -> None:
        self._det, self._cuda = det, device.startswith("cuda")
        self.t_wall = self.t_pmt = 0.0

    def __getattr__(self, name):
        return getattr(self._det, name)

    def _timed(self, fn, attr, *a):
        if self._cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a)
        if self._cuda:
            torch.cuda.synchronize()
        setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)
        return out

    def wall_intersect(self, pos, dir):
        return self._timed(self._det.wall_intersect, "t_wall", pos, dir)

    def wall_distance(self, pos, dir):
        return self._timed(self._det.wall_distance, "t_wall", pos, dir)

    def wall_normal(self, pos, dir, t, surf):
        return self._timed(self._det.wall_normal, "t_wall", pos, dir, t, surf)

    def pmt_intersect(self, pos, dir, wall_dist=None):
        return self._timed(self._det.pmt_intersect, "t_pmt", pos, dir, wall_dist)

    def wall_pmt_intersect(self, pos, dir):
        """The one-pass wall + PMT query (counted as PMT look-up time: its wall part is the float64 wall
        geometry that pmt_intersect computes anyway)."""
        return self._timed(self._det.wall_pmt_intersect, "t_pmt", pos, dir)


def run_one(
    name: str,
    n: int,
    device: str,
    chunk: int,
    seed: int = 0,
    backend: str = "auto",
    det: Detector | None = None,
) -> dict:
    """One timed transport of n muon-like photons; ``det`` (default: a fresh Detector.load(name)) keeps its
    look-up tables between calls, so a warmed-up detector times the transport alone."""
    det = Detector.load(name).to(device) if det is None else det
    med = Medium.load("water").to(device)
    gen = torch.Generator(device).manual_seed(seed)
    ph = muon_like_photons(det, med, n, gen, device)
    opt = Optics(
        wall_reflectivity=0.1, diffuse_fraction=1.0, pmt_reflectivity=0.1, chunk_size=chunk, backend=backend
    )
    opt = opt.to(device)
    tdet = TimedDetector(det, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hits = opt.sample(ph, tdet, med, gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    st = opt.last_stats
    fused = opt._fused_kernel(torch.device(device), det, False, True) is not None
    return dict(
        detector=name,
        backend="numba" if fused else "torch",
        n_pmts=det.n_pmts,
        photons=n,
        seconds=dt,
        photon_steps=st["steps"],
        photon_steps_per_s=st["steps"] / dt,
        photons_per_s=n / dt,
        rounds=st["rounds"],
        cathode_hits=len(hits),
        truncated=st["truncated"],
        outside=st["outside"],
        seconds_wall_intersect=tdet.t_wall,
        seconds_pmt_intersect=tdet.t_pmt,
        seconds_optics_own=dt - tdet.t_wall - tdet.t_pmt,
    )


def memory_child(name: str, n: int, device: str, chunk: int, threads: int | None, backend: str) -> None:
    if threads:
        torch.set_num_threads(threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    res = run_one(name, n, device, chunk, backend=backend)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["rss_before_mb"] = rss0 / 1024
    if device.startswith("cuda"):
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("MEMJSON " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=float, default=1e6, help="photons per detector for the throughput runs")
    ap.add_argument("--mem-n", type=float, default=1e7, help="photons for the peak-memory run (0: skip)")
    ap.add_argument("--detectors", nargs="+", default=["wcte", "sk"])
    ap.add_argument("--chunk", type=float, default=1e6)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba"], help="Optics backend")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="throughput runs per detector (the fastest run is stored, with the median)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optics.json"))
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        memory_child(a.mem_child, int(a.mem_n), a.device, int(a.chunk), a.threads, a.backend)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for name in a.detectors:
        det = Detector.load(name).to(a.device)
        t0 = time.perf_counter()  # one-time set-up of this detector: look-up tables (and JIT on first use)
        run_one(name, 20_000, a.device, int(a.chunk), backend=a.backend, det=det)
        setup_s = time.perf_counter() - t0
        runs = [
            run_one(name, int(a.n), a.device, int(a.chunk), seed=i, backend=a.backend, det=det)
            for i in range(max(1, a.repeat))
        ]
        r = max(runs, key=lambda x: x["photon_steps_per_s"])
        r["photon_steps_per_s_all_runs"] = [x["photon_steps_per_s"] for x in runs]
        r["photon_steps_per_s_median"] = statistics.median(r["photon_steps_per_s_all_runs"])
        r["seconds_setup_first_use"] = setup_s
        results.append(r)
        print(
            f"{name:5s} {r['photons']:.2e} photons: {r['seconds']:.2f} s, "
            f"{r['photon_steps_per_s']:.3e} photon-steps/s (median of {len(runs)}: "
            f"{r['photon_steps_per_s_median']:.3e}) "
            f"(wall_intersect {r['seconds_wall_intersect']:.2f} s, "
            f"pmt_intersect {r['seconds_pmt_intersect']:.2f} s, "
            f"optics own {r['seconds_optics_own']:.2f} s), {r['cathode_hits']} cathode hits",
            flush=True,
        )
    mem = None
    if a.mem_n > 0:
        cmd = [
            sys.executable,
            __file__,
            "--_mem-child",
            a.detectors[0],
            "--mem-n",
            str(a.mem_n),
            "--device",
            a.device,
            "--chunk",
            str(a.chunk),
            "--backend",
            a.backend,
        ] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mem = json.loads(next(li for li in out.splitlines() if li.startswith("MEMJSON "))[8:])
        cuda_mem = mem.get("cuda_max_allocated_mb")
        print(
            f"memory run: {mem['photons']:.1e} photons in {a.detectors[0]}: peak RSS "
            f"{mem['peak_rss_mb']:.0f} MB"
            + (f", CUDA max allocated {cuda_mem:.0f} MB" if cuda_mem else "")
            + f", {mem['photon_steps_per_s']:.3e} photon-steps/s"
        )
    out = dict(
        benchmark="optics",
        device=a.device,
        backend=a.backend,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),
        chunk_size=int(a.chunk),
        source="muon-like Cherenkov cones (beta = 1), see module doc",
        runs=results,
        memory=mem,
        target_photon_steps_per_s=1e7,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    print(f"wrote {atomic_write_json(a.out, out)}")


if __name__ == "__main__":
    main()
