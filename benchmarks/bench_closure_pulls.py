"""Closure pulls of the reconstruction: residual / reported uncertainty for contained 500 MeV muons.

Events (``closure_simulator``): 500 MeV mu- in WCTE from (0, 0, -1.2) m (``--detector sk``: SK from
(0, 0, -5) m) along (0.2, 0.1, 1), direct light only (wall/PMT reflection and Rayleigh off) so that the
physics response is the truth up to the muon's multiple scattering (MS).
``--no-ms`` switches the MC's multiple scattering off
(physics.emission.track_steps(multiple_scattering=False)) to separate the MS fluctuation from the fit itself;
with it, ``--fit-no-ms`` (X0 -> inf in the fit's model) and ``--exact-wavelength`` make the fit's model the
MC's own physics exactly (a sharp ring needs the wavelength sum: the folded kernel's Gaussian spread of the
Cherenkov angle is then too crude). ``--track-nodes`` sets the track quadrature. ``--ms-samples S`` fits
with the multiple-scattering over-dispersion (negative-binomial counts with the relative variance of S
sampled kink sets, fitting.response.PhysicsResponse.ms_relative_variance). ``--kink-modes M`` adds the
reconstruction's bent-track stage (M kink modes per axis as nuisance parameters) and reports the straight
stage's pulls beside it (``straight_stage``).
``--full-optics N`` simulates with the detector's wall/PMT reflection and the medium's Rayleigh scattering on
and fits with the expected indirect light of N traced photons per event (``--indirect template``, the
default: a per-PMT template retraced where the reconstruction freezes it, PhysicsResponse indirect
template; ``traced``: traced at every evaluation, ~50x the direct kernel's cost; ``none``: the direct-light
response on these events, the control).
Pull widths: standard deviation and the robust half 16-84 % inter-quantile range.
Pulls are reported with the pure-Hessian uncertainty (``cov_hessian``) and with the reported one (Hessian + MS
covariance, ``cov``) when the fit provides both.
Writes benchmarks/results/closure_pulls[_noms].json.
Usage: python benchmarks/bench_closure_pulls.py [--events N] [--detector wcte|sk]
    [--no-ms [--fit-no-ms --exact-wavelength]] [--track-nodes K] [--ms-samples S] [--device cuda]
    [--seed S] [--batch-size B] [--full-optics N [--indirect template|traced|none]] [--kink-modes M]
    [--name NAME]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import physics.simulate as psim  # noqa: E402
from benchmarks._util import write_json  # noqa: E402
from benchmarks.bench_reconstruct import DIRECTION, direct_light_simulator  # noqa: E402
from fitting.likelihood import HitLikelihood  # noqa: E402
from fitting.reconstruct import STATUS, reconstruct, resolutions  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from physics.emission import track_steps  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402

VERTICES = {"wcte": (0.0, 0.0, -1.2), "sk": (0.0, 0.0, -5.0)}  # [m], those of bench_reconstruct
VERTEX = VERTICES["wcte"]
__all__ = ["DIRECTION", "VERTEX", "VERTICES", "closure_simulator", "fit_model"]


def closure_simulator(
    no_ms: bool, device: str = "cpu", detector: str = "wcte", full_optics: bool = False
) -> Simulator:
    """The closure events' simulator: 500 MeV mu- in ``detector`` from VERTICES[detector] along DIRECTION,
    direct light only (wall/PMT reflection and Rayleigh off; ``full_optics``: the detector's default optics
    and the medium's Rayleigh scattering on); ``no_ms`` switches the MC's multiple scattering off (the
    Simulator calls physics.simulate.track_steps: replaced for the rest of the process)."""
    if no_ms:
        psim.track_steps = partial(track_steps, multiple_scattering=False)
    if full_optics:
        cfg = SimConfig(
            detector=detector, particle="mu-", energy=500.0, vertex=VERTICES[detector], direction=DIRECTION
        )
        return Simulator(cfg, device=device)
    return direct_light_simulator(detector, VERTICES[detector], device)


def fit_model(
    sim: Simulator,
    track_nodes: int = 32,
    exact_wavelength: bool = False,
    no_ms: bool = False,
    ms_samples: int = 0,
    colour_groups: int = 1,
    indirect: dict | None = None,
) -> tuple[PhysicsResponse, HitLikelihood]:
    """The fit's physics response and likelihood for ``sim``'s events: folded wavelengths (or the exact sum),
    ``track_nodes`` track cells; ``no_ms``: X0 -> inf in the model (no ring smearing, kinks, shortening);
    ``ms_samples``: sampled kink sets of the MS over-dispersion (negative-binomial counts; 0: Poisson);
    ``colour_groups``: the folded kernel's wavelength bands; ``indirect``: the response's expected
    scattered and reflected light (PhysicsResponse indirect, e.g. {"n_trace": 2000}; None: direct only)."""
    medium = sim.medium
    if no_ms:
        medium = copy.deepcopy(sim.medium)
        medium.radiation_length = math.inf
    resp = PhysicsResponse(
        sim.detector,
        medium,
        sim.sensors,
        "mu-",
        sim.optics,
        n_track_nodes=track_nodes,
        fold_wavelength=not exact_wavelength,
        colour_groups=colour_groups,
        ms_covariance=not no_ms,
        ms_samples=ms_samples,
        indirect=indirect,
    )
    return resp, HitLikelihood(**resp.likelihood_config(), window=sim.cfg.dark_window_ns).to(sim.device)


def robust_width(x: torch.Tensor) -> float:
    """Half the 16-84 % inter-quantile range (= sigma for a Gaussian; insensitive to a few outliers)."""
    if x.numel() < 2:
        return float("nan")
    q = torch.quantile(x.double(), torch.tensor([0.15865, 0.84135], dtype=torch.float64, device=x.device))
    return float(0.5 * (q[1] - q[0]))


def pull_summary(fit: dict, truth: dict, cov_key: str) -> dict:
    """Pull mean/std (with standard errors) using ``fit[cov_key]`` as the covariance."""
    f = dict(fit)
    f["cov"] = fit[cov_key]
    r = resolutions(f, truth)
    m = r["mask"]
    n = int(m.sum())
    names = ["x", "y", "z", "dir_a", "dir_b", "log_e"]
    p = r["pulls"][m][:, :6]
    return {
        "n": n,
        "pull_mean": {k: float(p[:, i].mean()) for i, k in enumerate(names)},
        "pull_std": {k: float(p[:, i].std()) for i, k in enumerate(names)},
        "pull_width_68": {k: float(robust_width(p[:, i])) for i, k in enumerate(names)},
        "pull_mean_err": 1.0 / math.sqrt(max(n, 1)),
        "pull_std_err": 1.0 / math.sqrt(max(2 * (n - 1), 1)),
        "bias": r["summary"]["bias"],
        "bias_err": r["summary"]["bias_err"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--detector", default="wcte", choices=sorted(VERTICES), help="detector preset")
    ap.add_argument("--no-ms", action="store_true", help="switch the MC's multiple scattering off")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--track-nodes", type=int, default=32, help="track quadrature cells of the fit's model")
    ap.add_argument("--exact-wavelength", action="store_true", help="fit: exact wavelength sum")
    ap.add_argument("--fit-no-ms", action="store_true", help="fit's model without multiple scattering")
    ap.add_argument("--colour-groups", type=int, default=1, help="fit: the folded kernel's wavelength bands")
    ap.add_argument(
        "--ms-samples",
        type=int,
        default=0,
        help="fit: sampled kink sets of the MS over-dispersion (negative binomial; 0: Poisson)",
    )
    ap.add_argument(
        "--full-optics",
        type=int,
        default=0,
        metavar="N_TRACE",
        help="MC with wall/PMT reflection and Rayleigh scattering; the fit adds the expected indirect light "
        "from N_TRACE traced photons per event (0: direct light only)",
    )
    ap.add_argument(
        "--indirect",
        default="template",
        choices=["template", "traced", "none"],
        help="with --full-optics, the fit's indirect light: a per-PMT template retraced at the fit's freeze "
        "points (PhysicsResponse indirect template), traced at every evaluation, or none (direct only)",
    )
    ap.add_argument(
        "--kink-modes",
        type=int,
        default=0,
        help="fit: the bent-track stage with this many kink modes per axis (reconstruct kink_modes; the "
        "straight stage's pulls reported beside it)",
    )
    ap.add_argument("--name", default=None, help="results name (default closure_pulls[_noms])")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sim = closure_simulator(args.no_ms, args.device, args.detector, args.full_optics > 0)
    t0 = time.perf_counter()
    res = sim.run(args.events, seed=args.seed, batch_size=min(args.events, 32))
    t_sim = time.perf_counter() - t0
    resp, like = fit_model(
        sim,
        args.track_nodes,
        args.exact_wavelength,
        args.fit_no_ms,
        args.ms_samples,
        args.colour_groups,
        None
        if args.full_optics <= 0 or args.indirect == "none"
        else {"n_trace": args.full_optics, "template": args.indirect == "template"},
    )
    t0 = time.perf_counter()
    fit = reconstruct(
        res["hits"],
        args.events,
        resp,
        like,
        "mu-",
        device=args.device,
        n_starts=2,
        batch_size=args.batch_size,
        max_iter=50,
        dtype=torch.float32,
        kink_modes=args.kink_modes,
    )
    t_fit = time.perf_counter() - t0
    truth = {k: res["truth"][k].to(args.device) for k in ("vertex", "direction", "energy")}
    out = {
        "events": args.events,
        "detector": args.detector,
        "multiple_scattering": not args.no_ms,
        "seed": args.seed,
        "device": args.device,
        "track_nodes": args.track_nodes,
        "fold_wavelength": not args.exact_wavelength,
        "colour_groups": args.colour_groups,
        "fit_multiple_scattering": not args.fit_no_ms,
        "ms_samples": args.ms_samples,
        "full_optics_n_trace": args.full_optics,
        "fit_indirect": args.indirect if args.full_optics > 0 else "none",
        "kink_modes": args.kink_modes,
        "n_ok": int(fit["ok"].sum()),
        "seconds_simulate": t_sim,
        "seconds_fit": t_fit,
        "reported": pull_summary(fit, truth, "cov"),
    }
    if "cov_hessian" in fit:
        out["hessian_only"] = pull_summary(fit, truth, "cov_hessian")
    if "straight_vertex" in fit:  # --kink-modes: the straight stage of the same fits
        keys = ("vertex", "direction", "energy", "t0", "cov")
        out["n_bent"] = int(((fit["status"] & STATUS["bent"]) > 0).sum())
        out["straight_stage"] = pull_summary({**fit, **{k: fit["straight_" + k] for k in keys}}, truth, "cov")
    write_json(args.name or ("closure_pulls_noms" if args.no_ms else "closure_pulls"), out)


if __name__ == "__main__":
    main()
