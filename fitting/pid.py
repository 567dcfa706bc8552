"""Particle identification (e vs mu) by the likelihood ratio of full event fits (design §5).

Each event is fitted (vertex, direction, energy, t0 by :func:`fitting.reconstruct.reconstruct`) under every
hypothesis h in ``responses`` (e.g. a muon track and an electron shower :class:`PhysicsResponse`), and the
hypotheses are compared by their best-fit negative log-likelihoods (the profile likelihood ratio with the
kinematics as nuisance parameters; Neyman-Pearson for simple hypotheses, e.g. Cowan, Statistical Data
Analysis, 1998, ch. 4; the Super-K/T2K fiTQun e/mu discriminant, Jiang et al., PRD 99 (2019) 092005,
sec. IV.B, is the same quantity: ln L_e - ln L_mu):

    Delta = NLL_mu - NLL_e = ln L_e^max - ln L_mu^max      (> 0: electron-like, < 0: muon-like).

An electron's EM cascade gives a diffuse, fuzzy-edged ring from a ~1-2 m long cascade of multiply scattered
particles; a muon gives a sharp-edged ring filling in towards the stopping point. The hypotheses differ in
the expected per-PMT charge pattern mu_i and the arrival times, which the per-PMT Poisson/time likelihood
sees directly.

Seeding: one common pre-fit (:func:`fitting.prefit.prefit` with the first track hypothesis' response) gives
vertex, direction and t0 for every hypothesis; the energy seed is recalibrated per hypothesis from the
total charge with that hypothesis' response (:func:`fitting.prefit.energy_from_charge`), since a 500 MeV
electron gives ~1.35 x the Cherenkov light of a 500 MeV muon (the muon stops radiating below its
Cherenkov threshold, ~54 MeV kinetic energy in water, and loses energy to ionisation only).

Scattered and reflected light: by default the responses model direct light only, validated on events
simulated with scattering and reflections switched off; with ``indirect`` (:func:`sample_models`, ``photonfit
pid --indirect N``) each hypothesis adds its own expected indirect light as a frozen per-PMT template of N
traced photons (:class:`fitting.response.PhysicsResponse` ``indirect`` template), validated on events with
the detector's wall/PMT reflection and Rayleigh scattering on (:func:`contained_sample` ``full_optics``).

Units: m, ns, MeV (kinetic). Shapes: E events, H hypotheses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from physics.config import ConfigError, check_number
from physics.constants import SHOWER_PARTICLES, TRACK_PARTICLES

from .likelihood import hits_to_dense
from .prefit import energy_from_charge, prefit
from .reconstruct import FAILED, STATUS, reconstruct

__all__ = ["identify", "binomial_upper_limit", "add_pid_parser"]


def _split_hypotheses(responses: dict[str, Any]) -> tuple[str, str]:
    """Names of the (track, shower) hypotheses used for Delta."""
    if not isinstance(responses, dict) or len(responses) < 2:
        raise ConfigError(
            f"responses: got {type(responses).__name__} {responses!r:.80}, expected a dict of >= 2 "
            "{name: ResponseModel}"
        )
    track = [k for k, r in responses.items() if getattr(r, "particle", k) in TRACK_PARTICLES]
    shower = [k for k, r in responses.items() if getattr(r, "particle", k) in SHOWER_PARTICLES]
    if not track or not shower:
        raise ConfigError(
            f"responses: particles {[getattr(r, 'particle', k) for k, r in responses.items()]}, expected at "
            f"least one track ({list(TRACK_PARTICLES)}) and one shower ({list(SHOWER_PARTICLES)}) hypothesis"
        )
    return track[0], shower[0]


def identify(
    hits: Any,
    n_events: int,
    responses: dict[str, Any],
    likelihood: Any,
    *,
    seeds: dict[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    n_starts: int = 1,
    max_iter: int = 40,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    min_hits: int = 5,
    n_group: float = 1.38,
    uncertainties: bool = False,
) -> dict[str, Any]:
    """Fit every event under every hypothesis and choose the particle type by the likelihood ratio.

    hits: record with pmt (N,) long, charge (N,) [p.e.], time (N,) [ns], event (N,) long;
    responses: {name: ResponseModel} with ``particle`` attributes (>= one track, e.g. 'mu-', and >= one
    shower, e.g. 'e-'), all over the same detector; likelihood: per-event NLL module shared by all
    hypotheses, or {name: module}; seeds: optional common seeds (vertex (E,3), direction (E,3), t0 (E,));
    the other arguments are passed to :func:`reconstruct` (per hypothesis, batched over events);
    uncertainties=False (default) skips the Hessian and Newton polish (~60 % of the fit time; changes the
    best-fit NLL by < 0.1, far below the e/mu separation), so ``converged`` then means the optimiser met
    its tolerance before ``max_iter``.

    Returns dict:
      hypotheses: list of H names (order of ``nll``'s columns); nll (E,H) best-fit NLL per hypothesis;
      delta (E,) = NLL_track - NLL_shower (> 0 electron-like; NaN when a fit failed);
      choice (E,) long index into hypotheses of the smallest NLL (-1 when failed);
      particle: list of E chosen names ('' when failed); ok (E,) bool: every hypothesis' fit finite and
      without a failure bit (nonfinite, no_hits, bad_input of fitting.reconstruct.STATUS), and the chosen
      hypothesis' vertex inside the detector (a losing hypothesis may fit a vertex outside);
      converged (E,) bool: all fits also met the convergence criterion; status (E,) int32 OR of all fits'
      status bits; fits: {name: reconstruct() output}; seed_energy (E,H) [MeV]; seconds (float).
    """
    n_events = check_number(n_events, "n_events", minimum=1, integer=True)
    track, shower = _split_hypotheses(responses)
    names = list(responses)
    likes = likelihood if isinstance(likelihood, dict) else {k: likelihood for k in names}
    missing = [k for k in names if k not in likes]
    if missing:
        raise ConfigError(f"likelihood: no entry for hypotheses {missing}; got {list(likes)}")
    n_pmts = {int(r.n_pmts) for r in responses.values()}
    if len(n_pmts) != 1:
        raise ConfigError(
            f"responses: n_pmts differ between hypotheses ({sorted(n_pmts)}), expected one detector"
        )
    dev = torch.device(device)
    ref = responses[track]
    det = getattr(ref, "detector", None)
    if det is None:
        raise ConfigError("responses: need a .detector with pmt_pos (P,3) for the common pre-fit")
    t_start = time.perf_counter()

    # ---- common pre-fit on the clean hits (events with NaN hits or no hits are flagged by reconstruct)
    pmt = torch.as_tensor(hits.pmt, device=dev).long()
    ev = torch.as_tensor(hits.event, device=dev).long()
    q = torch.as_tensor(hits.charge, device=dev).to(torch.float64)
    tt = torch.as_tensor(hits.time, device=dev).to(torch.float64)
    if ev.numel() and (int(ev.min()) < 0 or int(ev.max()) >= n_events):
        raise ConfigError(
            f"hits.event: values in [{int(ev.min())}, {int(ev.max())}], allowed [0, {n_events - 1}]"
        )
    bad_ev = torch.zeros(n_events, dtype=torch.bool, device=dev)
    bad_ev[ev[~(torch.isfinite(q) & torch.isfinite(tt))]] = True
    keep = ~bad_ev[ev]
    obs = hits_to_dense(pmt[keep], q[keep], tt[keep], ev[keep], n_events, n_pmts.pop())
    mu_dark = float(likes[track].mu_dark.mean()) if hasattr(likes[track], "mu_dark") else 0.0
    common = prefit(obs, det.pmt_pos.to(dev, torch.float64), ref, n_group=n_group, mu_dark=mu_dark)
    if seeds is not None:
        for k in ("vertex", "direction", "t0"):
            if k in seeds:
                common[k] = torch.as_tensor(seeds[k], device=dev, dtype=torch.float64)
    qtot = torch.where(obs["hit"], obs["charge"].to(torch.float64), torch.zeros((), dtype=torch.float64))
    qtot = qtot.sum(1) - mu_dark * obs["hit"].shape[1]

    fits: dict[str, dict[str, Tensor]] = {}
    seed_e = []
    for name in names:
        resp = responses[name]
        e_seed = energy_from_charge(qtot, resp, common["vertex"], common["direction"])
        seed_e.append(e_seed)
        fits[name] = reconstruct(
            hits,
            n_events,
            resp,
            likes[name],
            getattr(resp, "particle", name),
            seeds={**common, "energy": e_seed},
            device=dev,
            n_starts=n_starts,
            max_iter=max_iter,
            batch_size=batch_size,
            dtype=dtype,
            min_hits=min_hits,
            n_group=n_group,
            uncertainties=uncertainties,
        )
    nll = torch.stack([fits[k]["nll"] for k in names], 1)
    status = torch.zeros(n_events, dtype=torch.int32, device=dev)
    for k in names:
        status |= fits[k]["status"]
    # a losing hypothesis may legitimately prefer a vertex outside the tank (e.g. a muon entering from
    # outside to mimic a fuzzy ring): its NLL is still valid; only the chosen fit must be contained
    hard = FAILED & ~STATUS["outside"]
    finite = torch.isfinite(nll).all(1)
    choice = torch.where(finite[:, None], nll, torch.zeros_like(nll)).argmin(1)
    st_h = torch.stack([fits[k]["status"] for k in names], 1)
    chosen_st = st_h.gather(1, choice[:, None])[:, 0]
    ok = ((status & hard) == 0) & finite & ((chosen_st & STATUS["outside"]) == 0)
    converged = ok & ((st_h & STATUS["converged"]) > 0).all(1)
    delta = torch.where(ok, fits[track]["nll"] - fits[shower]["nll"], torch.full_like(nll[:, 0], math.nan))
    choice = torch.where(ok, choice, torch.full_like(choice, -1))
    return {
        "hypotheses": names,
        "track": track,
        "shower": shower,
        "nll": nll,
        "delta": delta,
        "choice": choice,
        "particle": [names[int(c)] if int(c) >= 0 else "" for c in choice],
        "ok": ok,
        "converged": converged,
        "status": status,
        "fits": fits,
        "seed_energy": torch.stack(seed_e, 1),
        "seconds": time.perf_counter() - t_start,
    }


def binomial_upper_limit(k: int, n: int, cl: float = 0.9) -> float:
    """One-sided Clopper-Pearson upper limit on a binomial rate after k successes in n trials.

    p_up solves P(X <= k | n, p_up) = 1 - cl, i.e. p_up = Beta^-1(cl; k + 1, n - k) (Clopper & Pearson,
    Biometrika 26 (1934) 404; for k = 0 it is 1 - (1 - cl)^(1/n), ~ 2.30 / n at 90 %)."""
    from scipy.stats import beta

    k = check_number(k, "k", minimum=0, integer=True)
    n = check_number(n, "n", minimum=1, integer=True)
    if k > n:
        raise ConfigError(f"k: got {k}, allowed 0..n={n}")
    check_number(cl, "cl", minimum=0.0, maximum=1.0, strict_min=True)
    return 1.0 if k == n else float(beta.ppf(cl, k + 1, n - k))


# ----------------------------------------------------------------------------------------------------------
# the validation sample (tests/test_pid.py, benchmarks/bench_pid.py)
# ----------------------------------------------------------------------------------------------------------
def contained_sample(
    particle: str, n: int, seed: int, energy: float = 500.0, full_optics: bool = False
) -> tuple[Any, dict[str, Any]]:
    """n contained e/mu events in the WCTE-like detector (r 2 m, h 4 m) for the PID validation: direct light
    only (wall/PMT reflection and Rayleigh scattering off), or with ``full_optics`` the detector's default
    wall/PMT reflectivities and the medium's Rayleigh scattering on (fit with :func:`sample_models`
    ``indirect``).

    Vertex |x|, |y| < 0.4 m, |z| in [0.9, 1.2] m on one end cap's side; direction within 30 deg of the tank
    axis pointing to the far end, so that a 500 MeV muon (CSDA range ~2.3 m) stops inside and an electron
    cascade is contained. Kinetic energy ``energy`` [MeV]; positions and directions drawn from a generator
    seeded with seed + 7919, the MC from ``seed``. Returns (physics.simulate.Simulator, its run result)."""
    from physics.simulate import SimConfig, Simulator

    if not isinstance(full_optics, bool):
        raise ConfigError(f"full_optics: got {full_optics!r}, allowed True or False")
    g = torch.Generator().manual_seed(seed + 7919)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    xy = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.4
    z = -sign * (0.9 + 0.3 * torch.rand(n, generator=g))
    cth = 1 - torch.rand(n, generator=g) * (1 - math.cos(math.radians(30.0)))
    ph = torch.rand(n, generator=g) * 2 * math.pi
    sth = (1 - cth**2).sqrt()
    d = torch.stack([sth * ph.cos(), sth * ph.sin(), sign * cth], 1)
    cfg = SimConfig(
        detector="wcte",
        particle=particle,
        energy=energy,
        vertex=(0.0, 0.0, 0.0),
        direction=(0.0, 0.0, 1.0),
        **({} if full_optics else {"optics": {"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0}}),
    )
    sim = Simulator(cfg)
    if not full_optics:
        sim.medium.rayleigh_scale.data.fill_(math.inf)  # no scattering: direct light is the whole signal
    return sim, sim.run(n, seed=seed, batch_size=n, vertices=torch.cat([xy, z[:, None]], 1), directions=d)


def sample_models(
    sim: Any, track_nodes: int = 32, depth_nodes: int = 24, indirect_trace: int = 0
) -> tuple[dict[str, Any], Any]:
    """The e- (shower) and mu- (track) physics responses and the hit likelihood for a :func:`contained_sample`
    simulator; ``indirect_trace`` > 0 adds each hypothesis' expected scattered and reflected light as a
    frozen per-PMT template of that many traced photons per event (0: direct light only)."""
    from .likelihood import HitLikelihood
    from .response import PhysicsResponse, indirect_template

    ind = indirect_template(indirect_trace)
    resp = {
        "e-": PhysicsResponse(
            sim.detector, sim.medium, sim.sensors, "e-", sim.optics, n_depth_nodes=depth_nodes, indirect=ind
        ),
        "mu-": PhysicsResponse(
            sim.detector,
            sim.medium,
            sim.sensors,
            "mu-",
            sim.optics,
            n_track_nodes=track_nodes,
            fold_wavelength=True,
            indirect=ind,
        ),
    }
    return resp, HitLikelihood(**resp["mu-"].likelihood_config(), window=sim.cfg.dark_window_ns)


# ----------------------------------------------------------------------------------------------------------
# CLI: photonfit pid events.h5 -o pid.h5
# ----------------------------------------------------------------------------------------------------------
def _responses_for_run(
    config: dict[str, Any],
    hyps: list[str],
    track_nodes: int,
    depth_nodes: int,
    indirect_trace: int = 0,
    detector_table: dict[str, Any] | None = None,
    sensor_values: dict[str, Any] | None = None,
):
    from .reconstruct import physics_response_for_run
    from .response import PhysicsResponse, indirect_template

    ind = indirect_template(indirect_trace)
    base, like, particle = physics_response_for_run(
        config, detector_table=detector_table, sensor_values=sensor_values, n_track_nodes=track_nodes
    )
    out = {}
    for h in hyps:
        if h in TRACK_PARTICLES:
            shape = {"n_track_nodes": track_nodes, "fold_wavelength": True}
        elif h in SHOWER_PARTICLES:
            shape = {"n_depth_nodes": depth_nodes}
        else:
            raise ConfigError(f"--hypotheses: got {h!r}, allowed {list(TRACK_PARTICLES + SHOWER_PARTICLES)}")
        out[h] = PhysicsResponse(
            base.detector, base.medium, base.sensors, h, base.optics, indirect=ind, **shape
        )
    return out, like, particle


def _write_pid_h5(path: Path, res: dict[str, Any], meta: dict[str, Any], overwrite: bool) -> None:
    import h5py

    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} exists; pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".h5.tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("pid")
            for k, u in (
                ("nll", "1"),
                ("delta", "1"),
                ("choice", "index"),
                ("ok", "1"),
                ("status", "bits"),
                ("seed_energy", "MeV"),
            ):
                g.create_dataset(k, data=res[k].detach().cpu().numpy()).attrs["unit"] = u
            g.attrs["hypotheses"] = json.dumps(res["hypotheses"])
            g.attrs["delta_definition"] = f"NLL_{res['track']} - NLL_{res['shower']} (> 0: shower-like)"
            g.attrs["meta"] = json.dumps(meta)
            for h, fit in res["fits"].items():
                fg = g.create_group(f"fit_{h}")
                for k, u in (
                    ("vertex", "m"),
                    ("direction", "1"),
                    ("energy", "MeV"),
                    ("t0", "ns"),
                    ("nll", "1"),
                    ("status", "bits"),
                    ("sigma_vertex", "m"),
                    ("sigma_energy", "MeV"),
                ):
                    fg.create_dataset(k, data=fit[k].detach().cpu().numpy()).attrs["unit"] = u
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cmd_pid(args: argparse.Namespace) -> int:
    from physics.io import read_run

    run = read_run(args.file, run=args.run)
    responses, like, particle = _responses_for_run(
        run.config,
        args.hypotheses,
        args.track_nodes,
        args.depth_nodes,
        args.indirect,
        run.detector,
        run.sensors,
    )
    res = identify(
        run.hits,
        run.n_events,
        responses,
        like,
        n_starts=args.starts,
        max_iter=args.max_iter,
        batch_size=args.batch_size,
        dtype=torch.float64 if args.float64 else torch.float32,
    )
    meta = {"input": str(args.file), "run": run.name, "true_particle": particle, "seconds": res["seconds"]}
    _write_pid_h5(Path(args.output), res, meta, args.overwrite)
    n_ok = int(res["ok"].sum())
    counts = {h: sum(p == h for p in res["particle"]) for h in res["hypotheses"]}
    print(
        f"identified {run.n_events} events in {res['seconds']:.1f} s: {n_ok} ok, "
        + ", ".join(f"{h} {c}" for h, c in counts.items())
        + f", failed {run.n_events - n_ok} -> {args.output}"
    )
    if particle in res["hypotheses"] and n_ok:
        wrong = n_ok - counts[particle]
        print(
            f"true particle {particle}: misidentified {wrong}/{n_ok} = {wrong / n_ok:.3%} "
            f"(90% upper limit {binomial_upper_limit(wrong, n_ok):.3%})"
        )
    return 0


def add_pid_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``photonfit pid events.h5 -o pid.h5`` (e/mu likelihood-ratio identification)."""
    p = subparsers.add_parser("pid", help="particle identification (e vs mu) by the fitted likelihood ratio")
    p.add_argument("file", help="run file from photonfit simulate")
    p.add_argument("-o", "--output", default="pid.h5", help="output HDF5 (written atomically)")
    p.add_argument("--run", default=None)
    p.add_argument("--hypotheses", nargs="+", default=["e-", "mu-"], help="particle hypotheses to compare")
    p.add_argument("--starts", type=int, default=1, help="start points per event and hypothesis (1-4)")
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="events fitted together")
    p.add_argument("--track-nodes", type=int, default=32, help="track quadrature cells (muon model)")
    p.add_argument("--depth-nodes", type=int, default=24, help="cascade depth cells (electron model)")
    p.add_argument("--float64", action="store_true", help="optimise in float64 (default float32)")
    p.add_argument(
        "--indirect",
        type=int,
        default=0,
        metavar="N",
        help="scattered and reflected light of N traced photons per event and hypothesis, held as a frozen "
        "per-PMT template during each fit (0: direct light only)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_pid)
    return p
