"""Resolution table vs the Cramér–Rao bound (issue 3): e- and mu- at several kinetic energies in the WCTE-like
and SK-like detectors.

Per cell (detector, particle, energy [MeV kinetic]): N contained events -- vertex uniform in the fiducial
volume (margin 0.5 m WCTE, 2 m SK), isotropic direction, accepted when the end of the light-producing length
(muon: CSDA range, physics.emission.csda_range; electron: depth holding 90% of the Raedel-Wiebusch
longitudinal profile, Gamma(a, b) quantile in radiation lengths) is inside the detector -- simulated with the
MC options the physics response models (direct light only: wall and PMT reflection and Rayleigh scattering
off, as the reconstruction closure tests), reconstructed in batches by fitting.reconstruct, and compared
with the truth. Beside each 68% resolution: the Cramér–Rao bound from fitting.fisher.event_fisher at the
true parameters, turned into the same 68% quantities by sampling N(0, F^-1) (fitting.fisher.crb_quantiles).
The cell's bound is the 68% quantile of the pooled samples of all its events (the ensemble resolution an
efficient estimator would show; ``crb_68``); the median of the per-event 68% bounds is given too.
Resolution 68% quantiles carry a bootstrap standard error (200 seeded resamples).

That bound treats the counts as Poisson about the kink-averaged (smeared) track, but each muon event is one
bent track. For muons the cell also gets the hybrid bound (``crb_hybrid_68``; fitting.fisher.hybrid_fisher):
the track's Highland kinks as random nuisance parameters (--kink-modes leading modes per transverse axis
with their N(0, 1) prior, the rest smeared), the information averaged over --kink-sets seeded kink sets per
event, on the first --hybrid-events events. Both bounds take the muon track on --bound-nodes quadrature
nodes (128: the bent track's sharper rings converge there, to 1 % against 256 in WCTE at 1 GeV; the fit
keeps --track-nodes). Cost of the hybrid bound with 16 modes on 128 nodes, 2 threads: ~1.5 s (WCTE), ~8 s
(SK) per event and kink set.

Electron cells get the bound with the cascade's light-yield fluctuation (``crb_yield_68``): the MC draws each
cascade's Cherenkov track length l from N(l(E), sigma_l) (physics.emission.shower_track_length, Raedel &
Wiebusch: sigma_l / l = 2.4, 1.5, 1.1 % at 200, 500, 1000 MeV) and the light is proportional to l, which the
expected model (the mean) cannot tell from the energy (l ~ E^1.000002): the bound's log E variance gets
(sigma_l / l)^2 added (independent of the rest; its leak into the vertex through the fit's correlations is
neglected).

Everything follows --device (simulation, fits, Fisher) and works in batches of events.
Writes benchmarks/results/resolution_{device}.json (atomic). Small CPU check:
  python benchmarks/bench_resolution.py --events 2 --detectors wcte --particles mu- --energies 500
Full table (GPU):
  python benchmarks/bench_resolution.py --device cuda --events 40
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import write_json  # noqa: E402
from fitting.fisher import crb_covariance, crb_quantiles, event_fisher, hybrid_fisher  # noqa: E402
from fitting.likelihood import HitLikelihood  # noqa: E402
from fitting.reconstruct import STATUS, reconstruct, resolutions  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from physics.config import ConfigError  # noqa: E402
from physics.constants import SHOWER_PARTICLES, TRACK_PARTICLES  # noqa: E402
from physics.emission import csda_range, shower_params, shower_track_length  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402

F64 = torch.float64
MARGIN = {"wcte": 0.5, "sk": 2.0}


def light_length(particle: str, energy: float, medium) -> float:
    """Length [m] along the direction that must stay inside the detector: muon CSDA range; EM cascade depth
    holding 90% of the R&W longitudinal profile (Gamma(a, b) in radiation lengths)."""
    e = torch.tensor([float(energy)], dtype=F64)
    if particle in TRACK_PARTICLES:
        return float(csda_range(particle, e, medium)[0])
    if particle in SHOWER_PARTICLES:
        from scipy.special import gammaincinv

        a, b = shower_params(particle, e)
        return float(gammaincinv(float(a[0]), 0.9) / float(b[0])) * float(medium.radiation_length)
    raise ConfigError(f"particle: got {particle!r}, allowed: {list(TRACK_PARTICLES + SHOWER_PARTICLES)}")


def contained_kinematics(
    det, length: float, n: int, margin: float, gen: torch.Generator, max_rounds: int = 400, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n vertices (n,3) [m] uniform in the fiducial volume and isotropic unit directions (n,3) whose point
    vertex + length * direction lies inside the detector (rejection sampling); returns them and the
    acceptance fraction. Raises ConfigError when fewer than n are found in max_rounds * chunk draws."""
    vs, ds, tried, got = [], [], 0, 0
    for _ in range(max_rounds):
        v = det.sample_fiducial(chunk, gen, margin=margin)
        d = torch.randn(chunk, 3, generator=gen, device=gen.device, dtype=v.dtype).to(v.device)
        d = d / d.norm(dim=1, keepdim=True)
        ok = det.inside(v + length * d)
        vs.append(v[ok])
        ds.append(d[ok])
        tried += chunk
        got += int(ok.sum())
        if got >= n:
            break
    if got < n:
        raise ConfigError(
            f"containment: only {got} of {tried} draws keep a {length:.2f} m track inside "
            f"detector {det.name!r}; allowed: cells where contained events exist"
        )
    return torch.cat(vs)[:n], torch.cat(ds)[:n], got / tried


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _q68_boot(x: torch.Tensor, n_boot: int, gen: torch.Generator) -> tuple[float, float]:
    """68% quantile of x and its bootstrap standard error."""
    if x.numel() == 0:
        return float("nan"), float("nan")
    q = float(torch.quantile(x, 0.68))
    if x.numel() < 2:
        return q, float("nan")
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=gen, device=gen.device).to(x.device)
    qs = torch.quantile(x[idx], 0.68, dim=1)
    return q, float(qs.std())


def run_cell(detector: str, particle: str, energy: float, a: argparse.Namespace, seed: int) -> dict:
    dev = torch.device(a.device)
    margin = MARGIN.get(detector, 0.5)
    cfg = SimConfig(
        detector=detector,
        particle=particle,
        energy=float(energy),
        fiducial_margin=margin,
        optics={"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0},
    )
    sim = Simulator(cfg, device=dev)
    sim.medium.rayleigh_scale.data.fill_(math.inf)  # direct light only: the physics response is the truth
    length = light_length(particle, energy, sim.medium)
    gen = torch.Generator(device=dev).manual_seed(seed)
    vtx, dirs, acc = contained_kinematics(sim.detector, length, a.events, margin, gen)
    t = time.perf_counter()
    res = sim.run(a.events, seed=seed + 1, batch_size=a.sim_batch, vertices=vtx, directions=dirs)
    _sync(dev)
    t_sim = time.perf_counter() - t

    def track_response(nodes: int) -> PhysicsResponse:
        return PhysicsResponse(
            sim.detector,
            sim.medium,
            sim.sensors,
            particle,
            sim.optics,
            n_track_nodes=nodes,
            fold_wavelength=True,
        )

    if particle in TRACK_PARTICLES:
        resp = track_response(a.track_nodes)
    else:
        resp = PhysicsResponse(
            sim.detector, sim.medium, sim.sensors, particle, sim.optics, n_depth_nodes=a.depth_nodes
        )
    like = HitLikelihood(**resp.likelihood_config(), window=cfg.dark_window_ns).to(dev)
    t = time.perf_counter()
    fit = reconstruct(
        res["hits"],
        a.events,
        resp,
        like,
        particle,
        device=dev,
        n_starts=a.starts,
        max_iter=a.max_iter,
        batch_size=a.batch_size,
        dtype=torch.float32 if a.float32 else F64,
        kink_modes=a.fit_kink_modes if particle in TRACK_PARTICLES else 0,
    )
    _sync(dev)
    t_fit = time.perf_counter() - t
    truth = {k: res["truth"][k].to(device=dev, dtype=F64) for k in ("vertex", "direction", "energy")}
    truth["t0"] = torch.zeros(a.events, dtype=F64, device=dev)
    ok = fit["ok"]
    r = resolutions(fit, truth, mask=ok)
    s = r["summary"]
    m = r["mask"]
    bgen = torch.Generator(device=dev).manual_seed(seed + 2)
    v68, v68e = _q68_boot(r["vertex_dist"][m], a.bootstrap, bgen)
    a68, a68e = _q68_boot(r["angle"][m], a.bootstrap, bgen)
    e68, e68e = _q68_boot(r["de_frac"][m].abs(), a.bootstrap, bgen)
    # Cramér–Rao bound at the truth, with the muon track on --bound-nodes nodes (the hybrid bound's bent
    # tracks need more than the fit's 32: fitting.fisher.hybrid_fisher)
    bound_resp = resp
    if particle in TRACK_PARTICLES and a.bound_nodes != a.track_nodes:
        bound_resp = track_response(a.bound_nodes)
    t = time.perf_counter()
    fi = event_fisher(bound_resp, like, truth, batch_size=a.fisher_batch)
    cov, cov_ok = crb_covariance(fi["F"])
    crb = crb_quantiles(cov, n_samples=a.crb_samples, seed=seed + 3)
    _sync(dev)
    t_fisher = time.perf_counter() - t
    # the hybrid bound: the track's multiple-scattering kinks as random nuisance parameters (each event is
    # one bent track; fitting.fisher.hybrid_fisher); None for responses without kinks (showers)
    crb_yield = None
    if particle not in TRACK_PARTICLES:  # the cascade's track-length fluctuation on top (module doc)
        l_mean, l_sig = shower_track_length(particle, truth["energy"], sim.medium)
        cov_y = cov.clone()
        cov_y[:, 5, 5] = cov_y[:, 5, 5] + (l_sig / l_mean) ** 2
        crb_yield = crb_quantiles(cov_y, n_samples=a.crb_samples, seed=seed + 3)
    crb_hyb, t_hybrid, n_h = None, 0.0, 0
    if a.kink_sets > 0 and particle in TRACK_PARTICLES:
        t = time.perf_counter()
        n_h = a.events if a.hybrid_events is None else min(a.hybrid_events, a.events)
        sub = {k: v[:n_h] for k, v in truth.items()}
        hyb = hybrid_fisher(
            bound_resp,
            like,
            sub,
            modes=a.kink_modes,
            kink_sets=a.kink_sets,
            seed=seed + 5,
            batch_size=a.hybrid_batch,
        )
        cov_h, _ = crb_covariance(hyb["F"])
        crb_hyb = crb_quantiles(cov_h, n_samples=a.crb_samples, seed=seed + 4)
        _sync(dev)
        t_hybrid = time.perf_counter() - t
    td = truth["direction"] / truth["direction"].norm(dim=-1, keepdim=True)
    dv = fit["vertex"] - truth["vertex"]
    long_bias = float((dv * td).sum(-1)[m].mean()) if int(m.sum()) else float("nan")

    def med(x: torch.Tensor) -> float:
        x = x[torch.isfinite(x)]
        return float(x.median()) if x.numel() else float("nan")

    hcov = fit.get("cov_hessian", fit["cov"])  # H^-1 alone (observed information at the fit)
    cell = {
        "detector": detector,
        "particle": particle,
        "energy_mev": float(energy),
        "n_events": a.events,
        "n_ok": int(ok.sum()),
        "failed_fraction": 1.0 - int(ok.sum()) / a.events,
        "containment_acceptance": acc,
        "light_length_m": length,
        "mean_hits": float(fit["n_hits"].double().mean()),
        "resolution_68": {"vertex_m": v68, "angle_deg": math.degrees(a68), "energy_frac": e68},
        # fits whose track reaches the wall (status end_at_wall): their energy is a lower limit; the energy
        # resolution of the others beside the cell's
        "n_end_at_wall": s["n_end_at_wall"],
        "energy_68_frac_not_at_wall": s["energy_68_frac_not_at_wall"],
        "resolution_68_bootstrap_se": {
            "vertex_m": v68e,
            "angle_deg": math.degrees(a68e),
            "energy_frac": e68e,
        },
        "bias": {
            "vertex_longitudinal_m": long_bias,
            "vertex_xyz_m": [s["bias"][k] for k in ("x", "y", "z")],
            "energy_frac_mean": float(r["de_frac"][m].mean()) if int(m.sum()) else float("nan"),
            "local": s["bias"],
        },
        "crb_68": _pooled_68(crb),
        "crb_68_median_per_event": {
            "vertex_m": med(crb["vertex"]),
            "angle_deg": math.degrees(med(crb["angle"])),
            "energy_frac": med(crb["energy"]),
        },
        "crb_sigma_median": {
            n: med(torch.sqrt(cov[:, i, i]))
            for i, n in enumerate(("x_m", "y_m", "z_m", "dir_a_rad", "dir_b_rad", "log_e", "t0_ns"))
        },
        "crb_ok": int(cov_ok.sum()),
        "fit_hessian_sigma_median": {
            n: med(torch.sqrt(hcov[:, i, i]))
            for i, n in enumerate(("x_m", "y_m", "z_m", "dir_a_rad", "dir_b_rad", "log_e", "t0_ns"))
        },
        "pull_std": s["pull_std"],
        "seconds": {
            "simulate_per_event": t_sim / a.events,
            "fit_per_event": t_fit / a.events,
            "fisher_per_event": t_fisher / a.events,
            "hybrid_fisher_per_event": t_hybrid / max(n_h, 1),
        },
    }
    cell["ratio_resolution_over_crb"] = _ratio(cell["resolution_68"], cell["crb_68"])
    if "straight_vertex" in fit:  # --fit-kink-modes: the straight stage's resolution on the same ok fits
        fs = {k: fit["straight_" + k] for k in ("vertex", "direction", "energy", "t0", "cov")}
        rs = resolutions({**fit, **fs}, truth, mask=ok)
        cell["fit_kink_modes"] = a.fit_kink_modes
        cell["n_bent"] = int(((fit["status"] & STATUS["bent"]) > 0)[ok].sum())
        cell["straight_resolution_68"] = {
            "vertex_m": float(rs["vertex_dist"][m].quantile(0.68)),
            "angle_deg": math.degrees(float(rs["angle"][m].quantile(0.68))),
            "energy_frac": float(rs["de_frac"][m].abs().quantile(0.68)),
        }
        cell["straight_pull_std"] = rs["summary"]["pull_std"]
        cell["ratio_straight_over_crb"] = _ratio(cell["straight_resolution_68"], cell["crb_68"])
    if crb_yield is not None:
        cell["crb_yield_68"] = _pooled_68(crb_yield)
        cell["ratio_resolution_over_crb_yield"] = _ratio(cell["resolution_68"], cell["crb_yield_68"])
    if crb_hyb is not None:
        cell["crb_hybrid_68"] = _pooled_68(crb_hyb)
        cell["crb_hybrid_events"] = n_h
        cell["crb_hybrid_kink_sets"] = a.kink_sets
        cell["crb_hybrid_ok"] = int(crb_hyb["ok"].sum())
        cell["ratio_resolution_over_crb_hybrid"] = _ratio(cell["resolution_68"], cell["crb_hybrid_68"])
    cell["within_20pct_of_crb"] = {k: bool(v <= 1.2) for k, v in cell["ratio_resolution_over_crb"].items()}
    return cell


def _pooled_68(q: dict) -> dict[str, float]:
    """A bound's pooled 68 % quantities (fitting.fisher.crb_quantiles) in the table's units."""
    return {
        "vertex_m": q["vertex_pooled"],
        "angle_deg": math.degrees(q["angle_pooled"]),
        "energy_frac": q["energy_pooled"],
    }


def _ratio(resolution: dict[str, float], bound: dict[str, float]) -> dict[str, float]:
    """resolution / bound per quantity (NaN where the bound is not positive)."""
    return {k: resolution[k] / bound[k] if bound[k] > 0 else float("nan") for k in bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--events", type=int, default=40, help="events per cell")
    ap.add_argument("--detectors", default="wcte,sk")
    ap.add_argument("--particles", default="e-,mu-")
    ap.add_argument("--energies", default="200,500,1000", help="kinetic energies [MeV]")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--starts", type=int, default=2, help="fit start points per event (1-4)")
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="events fitted together")
    ap.add_argument("--sim-batch", type=int, default=16, help="events simulated together")
    ap.add_argument("--fisher-batch", type=int, default=8, help="events per Fisher-information batch")
    ap.add_argument("--bound-nodes", type=int, default=128, help="muon track nodes of both bounds")
    ap.add_argument("--kink-modes", type=int, default=16, help="kink modes per axis of the hybrid bound")
    ap.add_argument(
        "--fit-kink-modes",
        type=int,
        default=0,
        help="muons: the fit's bent-track stage with this many kink modes per axis (reconstruct kink_modes)",
    )
    ap.add_argument("--kink-sets", type=int, default=2, help="kink sets of the hybrid bound (0: none)")
    ap.add_argument("--hybrid-events", type=int, default=None, help="events of the hybrid bound (all)")
    ap.add_argument("--hybrid-batch", type=int, default=2, help="events per hybrid-bound batch")
    ap.add_argument("--track-nodes", type=int, default=32, help="muon track quadrature cells")
    ap.add_argument("--depth-nodes", type=int, default=24, help="cascade depth cells")
    ap.add_argument("--float32", action="store_true", help="optimise and take the Hessian in float32")
    ap.add_argument("--crb-samples", type=int, default=4000, help="samples of N(0, F^-1) per event")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the quantile errors")
    ap.add_argument("--name", default=None, help="result name (default resolution_{device})")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: got 'cuda' but CUDA is not available; allowed: cpu")
    if a.events < 1:
        raise ConfigError(f"events: got {a.events}, allowed: >= 1")
    dets = [x.strip() for x in a.detectors.split(",") if x.strip()]
    parts = [x.strip() for x in a.particles.split(",") if x.strip()]
    energies = [float(x) for x in a.energies.split(",") if x.strip()]
    cells = []
    t_all = time.perf_counter()
    n_cells = len(dets) * len(parts) * len(energies)
    for i_d, det in enumerate(dets):
        for i_p, part in enumerate(parts):
            for i_e, en in enumerate(energies):
                seed = a.seed + 1000 * i_d + 100 * i_p + 10 * i_e
                c = run_cell(det, part, en, a, seed)
                cells.append(c)
                r, b, q = c["resolution_68"], c["crb_68"], c["ratio_resolution_over_crb"]
                print(
                    f"{det:5s} {part:3s} {en:6.0f} MeV | ok {c['n_ok']}/{c['n_events']} | "
                    f"vertex {100 * r['vertex_m']:6.1f} cm (CRB {100 * b['vertex_m']:5.1f}, "
                    f"x{q['vertex_m']:.2f}) | "
                    f"angle {r['angle_deg']:5.2f} deg (CRB {b['angle_deg']:5.2f}, x{q['angle_deg']:.2f}) | "
                    f"energy {100 * r['energy_frac']:5.1f}% (CRB {100 * b['energy_frac']:4.1f}, "
                    f"x{q['energy_frac']:.2f}"
                    + (
                        f"; yield x{c['ratio_resolution_over_crb_yield']['energy_frac']:.2f}"
                        if "crb_yield_68" in c
                        else ""
                    )
                    + f") | fit {c['seconds']['fit_per_event']:.2f} s/ev",
                    flush=True,
                )
                if "straight_resolution_68" in c:
                    r2, q2 = c["straight_resolution_68"], c["ratio_straight_over_crb"]
                    print(
                        f"      straight stage ({c['n_bent']} of {c['n_ok']} bent): vertex "
                        f"{100 * r2['vertex_m']:.1f} cm (x{q2['vertex_m']:.2f}), angle "
                        f"{r2['angle_deg']:.2f} deg (x{q2['angle_deg']:.2f}), energy "
                        f"{100 * r2['energy_frac']:.1f}% (x{q2['energy_frac']:.2f})",
                        flush=True,
                    )
                if "crb_hybrid_68" in c:
                    b2, q2 = c["crb_hybrid_68"], c["ratio_resolution_over_crb_hybrid"]
                    print(
                        f"      hybrid CRB (MS kinks as nuisance): vertex {100 * b2['vertex_m']:.1f} cm "
                        f"(x{q2['vertex_m']:.2f}), angle {b2['angle_deg']:.2f} deg (x{q2['angle_deg']:.2f}), "
                        f"energy {100 * b2['energy_frac']:.1f}% (x{q2['energy_frac']:.2f})",
                        flush=True,
                    )
                # the file is rewritten (atomically) after every cell: a stopped run keeps its finished cells
                write_results(a, cells, n_cells, time.perf_counter() - t_all)


def write_results(a: argparse.Namespace, cells: list, n_cells: int, seconds: float) -> None:
    """Write the finished cells (``partial`` while fewer than ``n_cells``)."""
    out = {
        "config": vars(a),
        "partial": len(cells) < n_cells,
        "notes": (
            "68% quantiles of |vertex - truth| [m], direction angle [deg], |E_fit/E_true - 1|; CRB from the "
            "expected Fisher information of the HitLikelihood model at the truth (fitting.fisher), pooled "
            "68% quantile of N(0, F^-1) samples over the cell's events; direct light only (no reflection, "
            "no Rayleigh), contained events. The MC has muon multiple scattering, delta rays and cascade "
            "fluctuations that the expected model averages over, so the bound can be out of reach."
        ),
        "total_seconds": seconds,
        "cells": cells,
    }
    write_json(a.name or f"resolution_{a.device}", out)


if __name__ == "__main__":
    main()
