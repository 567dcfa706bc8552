"""Where the closure's longitudinal vertex bias comes from: fits of subsets of the parameters from the truth.

The closure muons (``bench_closure_pulls.closure_simulator``: 500 MeV mu- in WCTE from (0, 0, -1.2) m along
(0.2, 0.1, 1), direct light, Highland multiple scattering in the MC) are fitted with the default physics
response and likelihood (``bench_closure_pulls.fit_model``; ``--ms-samples S``: negative-binomial counts)
three times, each from the truth with the other parameters held at the truth:

* ``longitudinal``: the vertex moves along the true direction only, with log E and t0;
* ``vertex``: the vertex moves in 3D, with log E and t0 (direction at the truth);
* ``all``: the full 7-parameter fit (vertex, two direction angles, log E, t0), as the reconstruction does.

Each is a float64 Newton iteration (eigenvalue-floored Hessian, step halving until the NLL decreases).
Reported per subset: the mean shift of the vertex along the true direction [cm] with its standard error,
the mean z shift, log E [%] and t0 [ps] shifts, and the rms transverse vertex and direction moves.
If the fitted model were the MC's physics, every mean would vanish within its error; a mean that appears
only once the transverse vertex or the direction is free is a non-linear effect of fitting a straight,
MS-averaged track to one bent track (the first-order bias, the mean gradient at the truth, is ~0).
Writes benchmarks/results/closure_bias_decomposition[_nb].json.

``--asimov-sets S`` asks instead whether the model predicts that bias itself: the fit's smeared straight
track is fitted (all 7 parameters, the same Newton iteration from the truth) to S noiseless bent tracks,
the sharp-ring expectations of S antithetic kink sets at the closure truth
(``PhysicsResponse.ms_kink_expectations``), with a count-only likelihood (the Poisson deviance, and the
negative binomial with the sets' own relative variance): no MC, no Poisson noise, no time term. Reported:
the mean shift per coordinate over the antithetic pairs (a pair's mean has no term linear in the kinks)
with its standard error, and the rms moves. Writes benchmarks/results/closure_bias_asimov.json.
``--data-nodes N`` puts the bent tracks (the data) on N track nodes (the fit keeps 32): a sharp-ring track
on 32 nodes shows its point emitters as features a continuous track does not have
(fitting.fisher.hybrid_fisher); results get "_nodesN".

``--first-order`` gives instead the first-order bias of the full fit at the truth, -Hbar^-1 mean(g), with
the mean gradient split into the likelihood's terms (the charge term of the unhit and of the hit PMTs, the
time term); writes benchmarks/results/closure_bias_first_order[_nb].json.

``--detector sk`` takes the SK closure events instead (bench_closure_pulls VERTICES; results get "_sk").
``--no-ms``: MC and fitted model without multiple scattering (results get "_noms"); ``--track-nodes K``
(default 32; "_nodesK") and ``--exact-wavelength`` (the exact wavelength sum instead of the folded kernel;
"_exact") set the fitted model, so that, e.g., the first-order bias of the folded and the exact model on the
same events (same seed) shows what the folding adds. ``--spe-sigma S`` sets the sensors' single-p.e. width
in the MC and the likelihood (e.g. 0.15: the likelihood's Gaussian n-p.e. charge model becomes exact and no
single p.e. falls below the threshold; "_speS").

    python benchmarks/closure_bias_decomposition.py [--events 96] [--seed 101] [--ms-samples S] [--threads 2]
    python benchmarks/closure_bias_decomposition.py --asimov-sets 64 [--data-nodes 128]
    python benchmarks/closure_bias_decomposition.py --first-order [--ms-samples 32]
    python benchmarks/closure_bias_decomposition.py --first-order --detector sk --no-ms --track-nodes 64
        [--exact-wavelength] [--batch-size 2]
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
from benchmarks.bench_closure_pulls import VERTICES, closure_simulator, fit_model  # noqa: E402
from fitting.likelihood import hits_to_dense  # noqa: E402
from fitting.reconstruct import _base_from_x, _hessian, _local_nll, _local_to_params  # noqa: E402

SUBSETS = ("longitudinal", "vertex", "all")


def _basis(subset: str, d: torch.Tensor) -> torch.Tensor:
    """(E,7,m) map from the subset's free parameters to the fit's local coordinates (dv (3), a, b, dlogE,
    dt0) about the truth; d (E,3) the true direction."""
    n = d.shape[0]
    eye = torch.eye(7, dtype=d.dtype).expand(n, 7, 7)
    if subset == "all":
        return eye.clone()
    rest = eye[:, :, 5:7]
    if subset == "vertex":
        return torch.cat([eye[:, :, 0:3], rest], 2)
    along = torch.zeros(n, 7, 1, dtype=d.dtype)
    along[:, 0:3, 0] = d
    return torch.cat([along, rest], 2)


def newton_from_truth(
    nll, basis: torch.Tensor, iters: int = 12, max_step: torch.Tensor | None = None
) -> torch.Tensor:
    """Minimise nll(y (E,n)) over y = basis z (basis (E,n,m)) from z = 0; returns y (E,n) at the minimum.
    max_step (m,): optional largest move per iteration of each z, the step scaled down as a whole to stay
    inside it (keeps a far Newton step of an ill-conditioned start out of unphysical parameters)."""
    n, _, m = basis.shape
    z = torch.zeros(n, m, dtype=torch.float64)

    def nll_z(zz: torch.Tensor) -> torch.Tensor:
        return nll(torch.einsum("nij,nj->ni", basis, zz))

    for _ in range(iters):
        f, g, h, _ = _hessian(nll_z, z)
        ev, u = torch.linalg.eigh(h)
        ev = ev.clamp_min(1e-6 * ev[:, -1:].abs())
        step = -(u @ ((u.transpose(1, 2) @ g[..., None]) / ev[..., None]))[..., 0]
        if max_step is not None:
            step = step / (step.abs() / max_step).amax(1, keepdim=True).clamp_min(1.0)
        lam = torch.ones(n, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(8):
                f_try = nll_z(z + lam[:, None] * step)
                worse = ~(f_try <= f)
                if not bool(worse.any()):
                    break
                lam = torch.where(worse, 0.5 * lam, lam)
        z = torch.where((f_try <= f)[:, None], z + lam[:, None] * step, z)
    return torch.einsum("nij,nj->ni", basis, z)


def _truth_base(tr: dict, rows: int) -> dict:
    """Local-coordinate expansion point (``_base_from_x``) of the MC truth ``tr`` (vertex, direction, energy
    (E,...)), t0 = 0, repeated to ``rows`` rows when E = 1."""
    x = torch.cat(
        [
            tr["vertex"].double(),
            tr["direction"].double(),
            tr["energy"].double().log()[:, None],
            torch.zeros(tr["energy"].shape[0], 1, dtype=torch.float64),
        ],
        1,
    )
    return _base_from_x(x.expand(rows, 8))


def _rms_moves(y: torch.Tensor, d: torch.Tensor) -> dict:
    """rms transverse vertex move [cm] and rms direction move [mrad] of local shifts y (E,7) about d (E,3)."""
    perp = y[:, :3] - (y[:, :3] * d).sum(1, keepdim=True) * d
    return {
        "rms_transverse_vertex_cm": float(perp.norm(dim=1).pow(2).mean().sqrt()) * 100.0,
        "rms_direction_mrad": float(y[:, 3:5].norm(dim=1).pow(2).mean().sqrt()) * 1000.0,
    }


def asimov(sets: int, threads: int, detector: str, data_nodes: int = 32) -> None:
    """The --asimov-sets mode (module doc); the bent tracks on ``data_nodes`` track nodes."""
    torch.set_num_threads(threads)
    if sets < 2 or sets % 2:
        raise SystemExit(f"--asimov-sets: got {sets}, allowed: an even number >= 2 (antithetic pairs)")
    sim = closure_simulator(False, detector=detector)
    tr = sim.run(1, seed=0, batch_size=1)["truth"]  # the closure's fixed truth (vertex, direction, energy)
    resp = fit_model(sim)[0].double()
    data_resp = fit_model(sim, track_nodes=data_nodes, ms_samples=sets)[0].double()
    base = _truth_base(tr, sets)
    p0 = _local_to_params(torch.zeros(sets, 7, dtype=torch.float64), base)
    one = {k: v[:1] for k, v in p0.items()}
    m = data_resp.ms_kink_expectations(one, antithetic=True)[0].double()  # (S,P)
    w = data_resp.ms_relative_variance(one, m[None])[0]
    r = 1.0 / w.clamp_min(1e-8)
    names = ("x_cm", "y_cm", "z_cm", "dir_a_mrad", "dir_b_mrad", "log_e_percent")
    scale = (100.0, 100.0, 100.0, 1000.0, 1000.0, 100.0)
    out = {
        "sets": sets,
        "data_track_nodes": data_nodes,
        "truth": {k: tr[k][0].tolist() for k in ("vertex", "direction", "energy")},
        "likelihoods": {},
    }
    for name in ("poisson", "negative_binomial"):
        t = time.perf_counter()

        def nll(y: torch.Tensor, name=name) -> torch.Tensor:
            mu = resp.expected(_local_to_params(y, base))["mu"].clamp_min(1e-30)
            pois = mu - m * mu.log()
            if name == "poisson":
                return pois.sum(1)
            return torch.where(w > 1e-8, (r + m) * torch.log1p(mu / r) - m * mu.log(), pois).sum(1)

        y = newton_from_truth(nll, _basis("all", base["d"]))
        pair = 0.5 * (y[: sets // 2] + y[sets // 2 :])
        along = (pair[:, :3] * base["d"][: sets // 2]).sum(1)
        se = 1.0 / math.sqrt(sets // 2)
        r_ = {
            "along_track_cm": {"mean": float(along.mean()) * 100, "err": float(along.std()) * 100 * se},
            **{
                k: {"mean": float(pair[:, i].mean()) * c, "err": float(pair[:, i].std()) * c * se}
                for i, (k, c) in enumerate(zip(names, scale, strict=True))
            },
            **_rms_moves(y, base["d"]),
            "seconds": time.perf_counter() - t,
        }
        out["likelihoods"][name] = r_
        a_ = r_["along_track_cm"]
        print(
            f"{name:18s} along-track {a_['mean']:+.3f} +- {a_['err']:.3f} cm, "
            + ", ".join(f"{k} {r_[k]['mean']:+.3f} +- {r_[k]['err']:.3f}" for k in names)
            + f"; rms transverse {r_['rms_transverse_vertex_cm']:.2f} cm, direction "
            f"{r_['rms_direction_mrad']:.1f} mrad",
            flush=True,
        )
    suffix = ("_sk" if detector == "sk" else "") + (f"_nodes{data_nodes}" if data_nodes != 32 else "")
    write_json("closure_bias_asimov" + suffix, out)


def first_order(resp, like, obs: dict, base: dict, batch: int) -> dict:
    """The --first-order mode (module doc): per-term first-order shifts (along-track [cm], log E [%])."""
    n = base["v"].shape[0]
    mu_dark = like.mu_dark.double()

    def terms(y: torch.Tensor, ob: dict, b: dict) -> dict:
        pred = resp.expected(_local_to_params(y, b))
        mu = pred["mu"]
        mv = ob["mu_rel_var"] * mu * mu if "mu_rel_var" in ob else None
        q = like.charge(mu + mu_dark, ob, mv)
        return {
            "unhit": torch.where(ob["hit"], 0.0 * q, q).sum(1),
            "hit_charge": torch.where(ob["hit"], q, 0.0 * q).sum(1),
            "time": like.time(pred, mu_dark, ob).sum(1),
        }

    grads = {k: [] for k in ("unhit", "hit_charge", "time")}
    hs = []
    for a in range(0, n, batch):
        b = {k: v[a : a + batch] for k, v in base.items()}
        ob = {k: v[a : a + batch] for k, v in obs.items()}
        y0 = torch.zeros(b["v"].shape[0], 7, dtype=torch.float64)
        y = y0.clone().requires_grad_()
        tt = terms(y, ob, b)
        for k, v in tt.items():
            grads[k].append(torch.autograd.grad(v.sum(), y, retain_graph=True)[0])
        hs.append(_hessian(lambda yy, ob=ob, b=b: sum(terms(yy, ob, b).values()), y0)[2])
    hinv = torch.linalg.inv(torch.cat(hs).mean(0))
    d = base["d"][0]
    out, total = {}, 0.0
    for k, g in grads.items():
        g = torch.cat(g)
        total = total + g
        sh = -(hinv @ g.T).T  # per-event first-order shifts (E,7)
        out[k] = {
            "along_track_cm": float((sh.mean(0)[:3] * d).sum()) * 100,
            "log_e_percent": float(sh.mean(0)[5]) * 100,
            "mean_grad_log_e": float(g[:, 5].mean()),
            "mean_grad_log_e_err": float(g[:, 5].std()) / n**0.5,
        }
    sh = -(hinv @ total.T).T
    along = (sh[:, :3] * d).sum(1) * 100
    out["total"] = {
        "along_track_cm": float(along.mean()),
        "along_track_err_cm": float(along.std()) / n**0.5,
        # per event (with H-bar shared): for paired comparisons of two models on the same events
        "along_track_per_event_cm": along.tolist(),
        "log_e_percent": float(sh.mean(0)[5]) * 100,
        "log_e_err_percent": float(sh[:, 5].std()) * 100 / n**0.5,
    }
    for k, r in out.items():
        print(
            f"{k:10s} first-order shift: along-track {r['along_track_cm']:+.3f} cm, log E "
            f"{r['log_e_percent']:+.3f} %",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=96)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--ms-samples", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detector", default="wcte", choices=sorted(VERTICES), help="detector preset")
    ap.add_argument(
        "--asimov-sets",
        type=int,
        default=0,
        help="fit S noiseless kink sets at the truth with a count-only likelihood instead (doc)",
    )
    ap.add_argument(
        "--data-nodes", type=int, default=32, help="--asimov-sets: track nodes of the bent tracks (data)"
    )
    ap.add_argument(
        "--first-order",
        action="store_true",
        help="the first-order bias at the truth split by likelihood term instead (doc)",
    )
    ap.add_argument("--no-ms", action="store_true", help="MC and fitted model without multiple scattering")
    ap.add_argument("--track-nodes", type=int, default=32, help="track cells of the fitted model")
    ap.add_argument("--exact-wavelength", action="store_true", help="fitted model: exact wavelength sum")
    ap.add_argument(
        "--colour-groups", type=int, default=1, help="fitted model: folded kernel's wavelength bands"
    )
    ap.add_argument(
        "--spe-sigma", type=float, default=None, help="the sensors' SPE width (MC and likelihood)"
    )
    args = ap.parse_args()
    changed = args.no_ms or args.exact_wavelength or args.track_nodes != 32 or args.spe_sigma
    if args.asimov_sets and (changed or args.colour_groups != 1):
        raise SystemExit(
            "--asimov-sets: without --no-ms, --exact-wavelength, --track-nodes, --colour-groups and "
            "--spe-sigma"
        )
    if args.asimov_sets:
        asimov(args.asimov_sets, args.threads, args.detector, args.data_nodes)
        return
    torch.set_num_threads(args.threads)
    n = args.events
    if args.no_ms and args.ms_samples:
        raise SystemExit("--ms-samples: only with multiple scattering (without --no-ms)")
    sim = closure_simulator(args.no_ms, detector=args.detector)
    if args.spe_sigma is not None:
        if not args.spe_sigma > 0:
            raise SystemExit(f"--spe-sigma: got {args.spe_sigma}; allowed: > 0")
        sim.sensors.spe_sigma = float(args.spe_sigma)
    res = sim.run(n, seed=args.seed, batch_size=min(n, 32))
    resp, like = fit_model(
        sim,
        args.track_nodes,
        exact_wavelength=args.exact_wavelength,
        no_ms=args.no_ms,
        ms_samples=args.ms_samples,
        colour_groups=args.colour_groups,
    )
    resp, like = resp.double(), like.double()
    h = res["hits"]
    obs = hits_to_dense(h.pmt.long(), h.charge.double(), h.time.double(), h.event.long(), n, resp.n_pmts)
    tr = res["truth"]
    base = _truth_base(tr, n)
    if args.ms_samples:
        w = resp.ms_relative_variance(_local_to_params(torch.zeros(n, 7, dtype=torch.float64), base))
        obs["mu_rel_var"] = w
    nb, sk = ("_nb" if args.ms_samples else ""), ("_sk" if args.detector == "sk" else "")
    sk += ("_noms" if args.no_ms else "") + ("_exact" if args.exact_wavelength else "")
    sk += f"_nodes{args.track_nodes}" if args.track_nodes != 32 else ""
    sk += f"_colour{args.colour_groups}" if args.colour_groups != 1 else ""
    sk += f"_spe{args.spe_sigma:g}" if args.spe_sigma is not None else ""
    if args.first_order:
        out = {
            "events": n,
            "seed": args.seed,
            "ms_samples": args.ms_samples,
            "multiple_scattering": not args.no_ms,
            "track_nodes": args.track_nodes,
            "fold_wavelength": not args.exact_wavelength,
            "colour_groups": args.colour_groups,
            "spe_sigma": sim.sensors.spe_sigma,
            "terms": first_order(resp, like, obs, base, args.batch_size),
        }
        write_json("closure_bias_first_order" + nb + sk, out)
        return
    out = {"events": n, "seed": args.seed, "ms_samples": args.ms_samples, "subsets": {}}
    for subset in SUBSETS:
        t = time.perf_counter()
        ys = []
        for a in range(0, n, args.batch_size):
            sl = slice(a, a + args.batch_size)
            bb = {k: v[sl] for k, v in base.items()}
            ob = {k: v[sl] for k, v in obs.items()}
            nll = _local_nll(resp, like, ob, bb, torch.float64)
            ys.append(newton_from_truth(nll, _basis(subset, bb["d"])))
        y = torch.cat(ys)
        d = base["d"]
        along = (y[:, :3] * d).sum(1)

        def stat(v: torch.Tensor, scale: float) -> dict:
            return {
                "mean": float(v.mean()) * scale,
                "err": float(v.std()) * scale / math.sqrt(n),
                "sd": float(v.std()) * scale,
            }

        r = {
            "along_track_cm": stat(along, 100.0),
            "z_cm": stat(y[:, 2], 100.0),
            "log_e_percent": stat(y[:, 5], 100.0),
            "t0_ps": stat(y[:, 6], 1000.0),
            **_rms_moves(y, d),
            "seconds": time.perf_counter() - t,
        }
        out["subsets"][subset] = r
        a_ = r["along_track_cm"]
        print(
            f"{subset:12s} along-track {a_['mean']:+.3f} +- {a_['err']:.3f} cm, log E "
            f"{r['log_e_percent']['mean']:+.3f} +- {r['log_e_percent']['err']:.3f} %, t0 "
            f"{r['t0_ps']['mean']:+.1f} +- {r['t0_ps']['err']:.1f} ps, transverse rms "
            f"{r['rms_transverse_vertex_cm']:.2f} cm, direction rms {r['rms_direction_mrad']:.2f} mrad",
            flush=True,
        )
    write_json("closure_bias_decomposition" + nb + sk, out)


if __name__ == "__main__":
    main()
