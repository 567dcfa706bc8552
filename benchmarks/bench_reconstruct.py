"""Reconstruction benchmark: time per event (batched), BFGS, LM, L-BFGS, Adam; iminuit MIGRAD side by side.

Events: 500 MeV mu- (``--particle e-``: electrons, the EM-cascade response on 24 depth cells, BFGS, L-BFGS
and Adam only, no MIGRAD) from a fixed contained vertex/direction (WCTE: (0, 0, -1.2) m along (0.2, 0.1, 1);
SK: (0, 0, -5) m along the same direction), direct light only (wall/PMT reflection and Rayleigh off) so the
physics response is the truth. The same NLL (HitLikelihood on PhysicsResponse, folded wavelengths, K = 32)
is minimised by fitting.reconstruct with (a) per-event BFGS from the Fisher matrix (the default), (b) Fisher-
scoring Levenberg-Marquardt, (c) torch L-BFGS, (d) Adam, and (e) by iminuit MIGRAD with numerical gradients
(fiTQun-style) from the same pre-fit seeds (fitting.prefit, deterministic), MIGRAD on the float64 NLL, the
function whose minimum fitting.reconstruct returns (float32 optimiser, then float64 Newton polish); the
float64 NLL at both minima is reported.
Also the expected-model cost before/after folding.
Writes benchmarks/results/reconstruct_{device}.json (device 'cpu' or 'cuda'; _{T}threads appended for T > 1).
Usage: python benchmarks/bench_reconstruct.py [--events N] [--sk N] [--minuit N] [--device cpu|cuda]
       [--threads T]
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
from fitting.likelihood import HitLikelihood, hits_to_dense  # noqa: E402
from fitting.prefit import prefit  # noqa: E402
from fitting.reconstruct import reconstruct, resolutions  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from physics.expected import PRUNE_MU  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402

F64 = torch.float64


DIRECTION = (0.2, 0.1, 1.0)


def direct_light_simulator(detector: str, vertex, device: str = "cpu", particle: str = "mu-") -> Simulator:
    """The benchmark events' simulator: 500 MeV ``particle`` from ``vertex`` [m] along DIRECTION in
    ``detector``, direct light only (wall/PMT reflection and Rayleigh off), so that the physics response is
    the truth."""
    cfg = SimConfig(
        detector=detector,
        particle=particle,
        energy=500.0,
        vertex=vertex,
        direction=DIRECTION,
        optics={"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0},
    )
    sim = Simulator(cfg, device=device)
    sim.medium.rayleigh_scale.data.fill_(math.inf)
    return sim


def setup(
    detector: str,
    vertex,
    n: int,
    seed: int,
    device: str = "cpu",
    ms_samples: int = 0,
    colour_groups: int = 1,
    particle: str = "mu-",
):
    """(simulator, n simulated events, physics response, likelihood) of the benchmark's events; ms_samples:
    the response's sampled kink sets for the multiple-scattering over-dispersion (0: Poisson counts);
    colour_groups: the folded kernel's wavelength bands (muons); particle: mu- (a track on 32 cells) or e-
    (an EM cascade on 24 depth cells)."""
    sim = direct_light_simulator(detector, vertex, device, particle)
    res = sim.run(n, seed=seed, batch_size=n)
    if particle == "mu-":
        shape = {
            "n_track_nodes": 32,
            "fold_wavelength": True,
            "colour_groups": colour_groups,
            "ms_samples": ms_samples,
        }
    else:
        shape = {"n_depth_nodes": 24}
    resp = PhysicsResponse(sim.detector, sim.medium, sim.sensors, particle, sim.optics, **shape)
    like = HitLikelihood(**resp.likelihood_config(), window=sim.cfg.dark_window_ns).to(device)
    return sim, res, resp, like


def time_expected(sim, k: int, fold: bool, dtype) -> float:
    resp = PhysicsResponse(
        sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=k, fold_wavelength=fold
    )
    dev = sim.detector.pmt_pos.device
    p = {
        "vertex": torch.tensor([[0.0, 0.0, -1.2]], dtype=dtype, requires_grad=True, device=dev),
        "direction": torch.tensor([DIRECTION], dtype=dtype, requires_grad=True, device=dev),
        "energy": torch.tensor([500.0], dtype=dtype, requires_grad=True, device=dev),
        "t0": torch.zeros(1, dtype=dtype, requires_grad=True, device=dev),
    }
    best = math.inf
    for _ in range(2):
        _sync(dev)
        t = time.perf_counter()
        o = resp.expected(p)
        (o["mu"].sum() + 1e-3 * o["t_mean"].sum() + 1e-3 * o["t_var"].sum()).backward()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


CPU_SECONDS: dict[str, float] = {}  # process CPU time of the last fit per optimiser (robust to a busy host)


def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def summary(fit, truth) -> dict:
    r = resolutions(fit, truth, mask=torch.isfinite(fit["nll"]))
    s = r["summary"]
    return {
        "vertex_68_m": s["vertex_68_m"],
        "angle_68_deg": s["angle_68_deg"],
        "energy_68_frac": s["energy_68_frac"],
        "pull_std": s["pull_std"],
        "bias": s["bias"],
        "n_ok": int(fit["ok"].sum()),
        "mean_nll": float(fit["nll"][torch.isfinite(fit["nll"])].mean()),
    }


def run_fit(res, resp, like, n, optimiser, dtype, max_iter, starts=1):
    trace: list[float] = []
    dev = resp.detector.pmt_pos.device
    _sync(dev)
    t = time.perf_counter()
    c = time.process_time()
    fit = reconstruct(
        res["hits"],
        n,
        resp,
        like,
        resp.particle,
        n_starts=starts,
        optimiser=optimiser,
        batch_size=n,
        max_iter=max_iter,
        dtype=dtype,
        trace=trace,
        device=dev,
    )
    _sync(dev)
    dt = time.perf_counter() - t
    CPU_SECONDS[optimiser] = time.process_time() - c
    return fit, dt, trace


def minuit_fit(res, resp, like, n) -> tuple[dict, float]:
    from iminuit import Minuit

    dev = resp.detector.pmt_pos.device

    obs = hits_to_dense(
        res["hits"].pmt, res["hits"].charge, res["hits"].time, res["hits"].event, n, resp.n_pmts
    )
    t = time.perf_counter()
    c = time.process_time()
    seed = prefit(obs, resp.detector.pmt_pos, resp, mu_dark=float(like.mu_dark))
    out = {
        "vertex": [],
        "direction": [],
        "energy": [],
        "nfcn": [],
        "nll": [],
        "hesse_nfcn": [],
        "hesse_sigma_vertex": [],
        "hesse_sigma_loge": [],
    }
    hesse_s = 0.0
    for i in range(n):
        o = {k: v[i : i + 1] for k, v in obs.items()}

        def nll(x, o=o):
            vx, vy, vz, th, ph, loge, t0 = (float(xx) for xx in x)
            d = torch.tensor(
                [[math.sin(th) * math.cos(ph), math.sin(th) * math.sin(ph), math.cos(th)]],
                dtype=F64,
                device=dev,
            )
            p = {
                "vertex": torch.tensor([[vx, vy, vz]], dtype=F64, device=dev),
                "direction": d,
                "energy": torch.tensor([math.exp(loge)], dtype=F64, device=dev),
                "t0": torch.tensor([t0], dtype=F64, device=dev),
            }
            with torch.no_grad():
                return float(like(resp.expected(p), o))

        d0 = seed["direction"][i]
        start = [float(x) for x in seed["vertex"][i]] + [
            math.acos(float(d0[2].clamp(-1, 1))),
            math.atan2(float(d0[1]), float(d0[0])),
            math.log(float(seed["energy"][i])),
            float(seed["t0"][i]),
        ]
        m = Minuit(nll, start, name=("vx", "vy", "vz", "theta", "phi", "loge", "t0"))
        m.errordef = Minuit.LIKELIHOOD
        m.errors = (0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.5)
        m.migrad()
        v = m.values
        n0, th = m.nfcn, time.perf_counter()
        m.hesse()  # MINUIT's numerical second derivatives: the conventional per-event uncertainties
        hesse_s += time.perf_counter() - th
        out["hesse_nfcn"].append(m.nfcn - n0)
        out["hesse_sigma_vertex"].append([m.errors[k] for k in ("vx", "vy", "vz")])
        out["hesse_sigma_loge"].append(m.errors["loge"])
        out["vertex"].append([v[0], v[1], v[2]])
        out["direction"].append(
            [math.sin(v[3]) * math.cos(v[4]), math.sin(v[3]) * math.sin(v[4]), math.cos(v[3])]
        )
        out["energy"].append(math.exp(v[5]))
        out["nfcn"].append(n0)
        out["nll"].append(m.fval)
    dt = time.perf_counter() - t
    CPU_SECONDS["minuit"] = time.process_time() - c
    res = {k: torch.tensor(v, dtype=F64, device=dev) for k, v in out.items()}
    res["hesse_seconds"] = hesse_s
    return res, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=6)
    ap.add_argument("--sk", type=int, default=2)
    ap.add_argument("--minuit", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (output reconstruct_{device}.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--optimisers", default="bfgs,lm,lbfgs,adam", help="comma list for the WCTE comparison")
    ap.add_argument("--ours", default="bfgs", help="optimiser compared with MIGRAD")
    ap.add_argument("--skip-kernel", action="store_true", help="skip the expected-model kernel timings")
    ap.add_argument(
        "--ms-samples",
        type=int,
        default=0,
        help="MS over-dispersion: sampled kink sets (negative-binomial counts; 0: Poisson)",
    )
    ap.add_argument("--colour-groups", type=int, default=1, help="the folded kernel's wavelength bands")
    ap.add_argument("--particle", default="mu-", choices=["mu-", "e-"], help="e-: no LM, no MIGRAD")
    ap.add_argument("--name", default=None, help="result name (default reconstruct_{device}[_{T}threads])")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    muon = a.particle == "mu-"
    model = (
        f"folded wavelengths ({a.colour_groups} band(s)), K=32, (event, PMT) pairs with direct light bounded "
        f"below {PRUNE_MU} p.e. skipped"
        if muon
        else "EM cascade on 24 depth cells, float64 Fisher-scoring polish and covariance"
    )
    out: dict = {
        "config": vars(a),
        "notes": f"500 MeV {a.particle}, direct light only, {model}; {a.threads} torch thread(s) on "
        f"{a.device}; seconds include the pre-fit, the optimiser and the float64 Hessian/Newton polish",
    }
    if not muon:
        a.optimisers = ",".join(o for o in a.optimisers.split(",") if o != "lm")
        a.ours, a.minuit, a.skip_kernel = "bfgs", 0, True
    n = a.events
    sim, res, resp, like = setup(
        "wcte", (0.0, 0.0, -1.2), n, 5, a.device, a.ms_samples, a.colour_groups, a.particle
    )
    if not a.skip_kernel:
        out["expected_model_ms_mu_plus_grad_wcte"] = {
            "exact_K128_f64": 1e3 * time_expected(sim, 128, False, F64),
            "folded_K128_f64": 1e3 * time_expected(sim, 128, True, F64),
            "folded_K32_f64": 1e3 * time_expected(sim, 32, True, F64),
            "folded_K32_f32": 1e3 * time_expected(sim, 32, True, torch.float32),
        }
        print(out["expected_model_ms_mu_plus_grad_wcte"])
    wc = {}
    iters = {"bfgs": 40, "lm": 40, "lbfgs": 40, "adam": 150}
    warm = {"hits": res["hits"].select(res["hits"].event < 1), "truth": {}}
    for opt in set(a.optimisers.split(",")) | {a.ours}:  # one-time costs (functorch/autograd set-up) untimed
        run_fit(warm, resp, like, 1, opt, torch.float32, 3)
    for opt in a.optimisers.split(","):
        fit, sec, trace = run_fit(res, resp, like, n, opt, torch.float32, iters[opt])
        name = f"{opt}_f32"
        wc[name] = {
            "seconds_per_event": sec / n,
            "cpu_seconds_per_event": CPU_SECONDS[opt] / n,
            "n_evals": len(trace),
            "nll_trace": trace[:: 1 if opt in ("lm", "bfgs") else 3],
            **summary(fit, res["truth"]),
        }
        print(name, {k: v for k, v in wc[name].items() if k != "nll_trace"})
    m = min(a.minuit, n)
    if m > 0:
        sub = {
            "hits": res["hits"].select(res["hits"].event < m),
            "truth": {k: v[:m] for k, v in res["truth"].items()},
        }
        fit_l, sec_l, trace_l = run_fit(sub, resp, like, m, a.ours, torch.float32, 40)
        mf, sec_m_all = minuit_fit(sub, resp, like, m)
        sec_h = mf.pop("hesse_seconds")
        sec_m = sec_m_all - sec_h  # MIGRAD alone (pre-fit seeds included)
        tr = {k: v.to(dev) for k, v in sub["truth"].items()}
        dv = (mf["vertex"] - tr["vertex"].double()).norm(dim=-1)
        ang = torch.rad2deg(torch.acos((mf["direction"] * tr["direction"].double()).sum(-1).clamp(-1, 1)))
        de = mf["energy"] / tr["energy"].double() - 1
        rl = resolutions(fit_l, tr, mask=torch.isfinite(fit_l["nll"]))
        wc["minuit_vs_ours"] = {
            "ours": a.ours,
            "events": m,
            "minuit_seconds_per_event": sec_m / m,
            "minuit_hesse_seconds_per_event": sec_h / m,
            "ours_seconds_per_event": sec_l / m,
            "speed_ratio": sec_m / sec_l,
            # ours includes its float64 Hessian (uncertainties): like for like is MIGRAD + HESSE
            "speed_ratio_with_uncertainties": (sec_m + sec_h) / sec_l,
            "minuit_hesse_nfcn": mf["hesse_nfcn"].tolist(),
            # the same Hessian by two methods: MINUIT's finite differences vs our autograd (vertex and
            # log E are the same parameters in both parametrisations)
            "minuit_hesse_sigma_vertex_m": mf["hesse_sigma_vertex"].tolist(),
            "ours_hessian_sigma_vertex_m": torch.diagonal(fit_l["cov_hessian"], dim1=1, dim2=2)[:, :3]
            .sqrt()
            .tolist(),
            "minuit_hesse_sigma_loge": mf["hesse_sigma_loge"].tolist(),
            "ours_hessian_sigma_loge": torch.sqrt(fit_l["cov_hessian"][:, 5, 5]).tolist(),
            "minuit_cpu_seconds_per_event": CPU_SECONDS["minuit"] / m,
            "ours_cpu_seconds_per_event": CPU_SECONDS[a.ours] / m,
            "cpu_speed_ratio": CPU_SECONDS["minuit"] / CPU_SECONDS[a.ours],
            "minuit_nfcn": mf["nfcn"].tolist(),
            "ours_evals": len(trace_l),
            "minuit_nll_f64": mf["nll"].tolist(),
            "ours_nll_f64": fit_l["nll"].tolist(),
            "minuit_dv_m": dv.tolist(),
            "minuit_angle_deg": ang.tolist(),
            "minuit_de_frac": de.tolist(),
            "ours_dv_m": rl["vertex_dist"].tolist(),
            "ours_angle_deg": torch.rad2deg(rl["angle"]).tolist(),
            "ours_de_frac": rl["de_frac"].tolist(),
        }
        print("minuit", wc["minuit_vs_ours"])
    out["wcte"] = wc
    if a.sk > 0:
        sim, res, resp, like = setup(
            "sk", (0.0, 0.0, -5.0), a.sk, 6, a.device, a.ms_samples, a.colour_groups, a.particle
        )
        sk_opts = [o for o in a.optimisers.split(",") if o != "adam"]
        for opt in sk_opts:
            run_fit({"hits": res["hits"].select(res["hits"].event < 1)}, resp, like, 1, opt, torch.float32, 2)
        out["sk"] = {}
        for opt in sk_opts:
            fit, sec, trace = run_fit(res, resp, like, a.sk, opt, torch.float32, 40)
            out["sk"][f"{opt}_f32"] = {
                "seconds_per_event": sec / a.sk,
                "cpu_seconds_per_event": CPU_SECONDS[opt] / a.sk,
                "n_evals": len(trace),
                **summary(fit, res["truth"]),
            }
            print("sk", opt, out["sk"][f"{opt}_f32"])
    suffix = "" if a.threads == 1 else f"_{a.threads}threads"
    write_json(a.name or f"reconstruct_{dev.type}{suffix}", out)


if __name__ == "__main__":
    main()
