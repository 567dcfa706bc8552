"""Study: does the MS line-fit model predict the reconstruction's residuals event by event?

Records the MC track steps (physics.simulate.track_steps wrapped), runs the closure fit (500 MeV mu- in
WCTE, direct light only), and compares per event the fitted residual (transverse vertex offset, angle)
with the straight-line fit of the sampled track predicted by fitting.uncertainty for each weighting.
Writes benchmarks/results/<name>.json. Usage: python benchmarks/ms_fit_study.py --events N --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import physics.simulate as psim  # noqa: E402
from benchmarks._util import write_json  # noqa: E402
from fitting.likelihood import HitLikelihood  # noqa: E402
from fitting.reconstruct import reconstruct, resolutions  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from fitting.uncertainty import cartesian_to_local, sampled_track_fit, track_ms_covariance  # noqa: E402
from physics.emission import track_steps  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402

REC = []


def rec_steps(*a, **k):
    st = track_steps(*a, **k)
    REC.append(st)
    return st


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=202)
    ap.add_argument("--name", default="ms_fit_study")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    psim.track_steps = rec_steps
    cfg = SimConfig(
        detector="wcte",
        particle="mu-",
        energy=500.0,
        vertex=(0.0, 0.0, -1.2),
        direction=(0.2, 0.1, 1.0),
        optics={"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0},
    )
    sim = Simulator(cfg, device=args.device)
    sim.medium.rayleigh_scale.data.fill_(math.inf)
    n = args.events
    res = sim.run(n, seed=args.seed, batch_size=n)
    assert len(REC) == 1
    steps = REC[0]
    det = sim.detector
    resp = PhysicsResponse(
        det, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    like = HitLikelihood(**resp.likelihood_config(), window=cfg.dark_window_ns).to(args.device)
    fit = reconstruct(
        res["hits"],
        n,
        resp,
        like,
        "mu-",
        device=args.device,
        n_starts=2,
        batch_size=64,
        max_iter=50,
        dtype=torch.float32,
    )
    tr = {k: res["truth"][k].to(args.device).double() for k in ("vertex", "direction", "energy")}
    kw = dict(
        particle="mu-",
        medium=sim.medium,
        wall=(det.shape, det.radius, det.height),
        pmt_radius=float(det.pmt_radius.double().mean()),
        detection=sim.sensors.quantum_efficiency,
    )
    out = {"events": n, "seed": args.seed}
    td = tr["direction"] / tr["direction"].norm(dim=-1, keepdim=True)
    for wt in ("likelihood", "positional"):
        pred, basis = sampled_track_fit(steps, tr["vertex"], td, tr["energy"], weighting=wt, **kw)
        u1, u2 = basis
        dv = fit["vertex"] - tr["vertex"]
        fd = fit["direction"]
        obs = torch.stack([(dv * u1).sum(-1), (dv * u2).sum(-1), (fd * u1).sum(-1), (fd * u2).sum(-1)], 1)
        m = fit["ok"]
        o, p = obs[m], pred[m]
        stats = {}
        for i, nm in enumerate(["a1", "a2", "b1", "b2"]):
            x, y = p[:, i], o[:, i]
            cc = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
            slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
            stats[nm] = {
                "std_pred": float(x.std()),
                "std_obs": float(y.std()),
                "corr": cc,
                "slope": slope,
                "std_obs_minus_pred": float((y - x).std()),
            }
        cov8 = track_ms_covariance(
            fit["vertex"].nan_to_num(),
            fit["direction"].nan_to_num(1.0),
            fit["energy"].nan_to_num(500.0),
            weighting=wt,
            **kw,
        )
        c8 = cov8[:, [0, 1, 2, 3, 4, 5]][:, :, [0, 1, 2, 3, 4, 5]]
        sd = torch.sqrt(torch.diagonal(c8, dim1=1, dim2=2).clamp_min(0))
        stats["model_sqrt_diag_mean"] = sd.mean(0).tolist()
        f2 = dict(fit)
        loc = cartesian_to_local(cov8, fit["e1"].nan_to_num(), fit["e2"].nan_to_num())
        f2["cov"] = fit.get("cov_hessian", fit["cov"]) + loc
        r = resolutions(f2, tr)
        stats["pull_std"] = r["summary"]["pull_std"]
        stats["pull_mean"] = r["summary"]["pull_mean"]
        out[wt] = stats
    # diagnostics: photon-weighted mean transverse displacement / angle of the sampled track, and a linear
    # regression of the fitted residual on them (understanding only; nothing here feeds the model)
    ev = steps.event
    v0 = tr["vertex"][ev]
    mid = 0.5 * (steps.x0 + steps.x1).double() - v0
    seg = (steps.x1 - steps.x0).double()
    kd = seg / seg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    u1, u2 = basis
    w = steps.n_photons.double()
    s_l = (mid * td[ev]).sum(-1)
    feats = {}
    for ax, u in (("1", u1), ("2", u2)):
        x = (mid * u[ev]).sum(-1)
        th = (kd * u[ev]).sum(-1)
        for nm, val in (("xbar", x), ("thbar", th), ("x_early", x), ("th_early", th)):
            ww = w if "early" not in nm else w * (s_l < 0.5)
            num = torch.zeros(n, dtype=torch.float64, device=w.device).index_add_(0, ev, ww * val)
            den = torch.zeros(n, dtype=torch.float64, device=w.device).index_add_(0, ev, ww)
            feats[nm + ax] = num / den.clamp_min(1e-30)
    dv = fit["vertex"] - tr["vertex"]
    m = fit["ok"]
    reg = {}
    for ax, u in (("1", u1), ("2", u2)):
        for tgt_nm, tgt in (("a", (dv * u).sum(-1)), ("b", (fit["direction"] * u).sum(-1))):
            for fs in (("xbar", "thbar"), ("x_early", "th_early")):
                xm = torch.stack([feats[f + ax][m] for f in fs] + [torch.ones_like(tgt[m])], 1)
                coef = torch.linalg.lstsq(xm, tgt[m][:, None]).solution[:, 0]
                resid = tgt[m] - xm @ coef
                reg[f"{tgt_nm}{ax}~{'+'.join(fs)}"] = {
                    "coef": coef.tolist(),
                    "r2": float(1 - resid.var() / tgt[m].var()),
                }
    out["regressions"] = reg
    fh = dict(fit)
    fh["cov"] = fit.get("cov_hessian", fit["cov"])
    out["hessian_only_pull_std"] = resolutions(fh, tr)["summary"]["pull_std"]
    out["reported_pull_std"] = resolutions(fit, tr)["summary"]["pull_std"]
    write_json(args.name, out)


if __name__ == "__main__":
    main()
