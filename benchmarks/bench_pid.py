"""e/mu identification benchmark: misidentification rates, Delta distributions, time per event.

Events: 500 MeV e- and mu- in the WCTE-like detector (r 2 m, h 4 m), vertex |x|,|y| < 0.4 m, |z| in
[0.9, 1.2] m on one end cap's side, direction within 30 deg of the tank axis pointing to the far end, so a
500 MeV muon (CSDA range ~2.3 m) stops inside and an electron cascade is contained. DIRECT LIGHT ONLY:
wall/PMT reflection and Rayleigh scattering are switched off in the simulation, because the physics
response (fitting.response.PhysicsResponse) models direct light only; rates with scattered/reflected light
are NOT measured here.

Each event is fitted under both hypotheses by fitting.pid.identify (common pre-fit, per-hypothesis energy
seed, L-BFGS, float32, 1 start, no Hessian). Delta = NLL_mu - NLL_e; misID(e) = P(Delta < 0 | e),
misID(mu) = P(Delta > 0 | mu), with one-sided 90% Clopper-Pearson upper limits. Events are produced in
chunks of ``--chunk`` e + ``--chunk`` mu (seeds 1000 + 2i, 1001 + 2i) until ``--budget-s`` of wall time is
spent or ``--max-events`` per type are done. Writes benchmarks/results/pid.json.
Usage: python benchmarks/bench_pid.py [--budget-s 540] [--max-events 400] [--chunk 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import write_json  # noqa: E402
from fitting.pid import binomial_upper_limit, contained_sample, identify, sample_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--max-events", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    delta = {"e-": [], "mu-": []}
    failed = {"e-": 0, "mu-": 0}
    fit_s = {"e-": 0.0, "mu-": 0.0}
    sim_s = 0.0
    e_res = {"e-": [], "mu-": []}
    t_all = time.perf_counter()
    i = 0
    while time.perf_counter() - t_all < a.budget_s and len(delta["e-"]) + failed["e-"] < a.max_events:
        for k, p in enumerate(("e-", "mu-")):
            t = time.perf_counter()
            sim, res = contained_sample(p, a.chunk, seed=1000 + 2 * i + k)
            sim_s += time.perf_counter() - t
            resp, like = sample_models(sim)
            r = identify(res["hits"], a.chunk, resp, like, max_iter=a.max_iter, batch_size=a.chunk)
            fit_s[p] += r["seconds"]
            ok = r["ok"]
            failed[p] += int((~ok).sum())
            delta[p] += r["delta"][ok].tolist()
            e_fit = r["fits"][p]["energy"][ok] / res["truth"]["energy"].double()[ok] - 1
            e_res[p] += e_fit.tolist()
        i += 1
        print(
            f"chunk {i}: e {len(delta['e-'])} mu {len(delta['mu-'])} events, "
            f"{time.perf_counter() - t_all:.0f} s",
            flush=True,
        )
    qs = [0.0, 0.01, 0.05, 0.16, 0.5, 0.84, 0.95, 0.99, 1.0]
    out = {}
    for p, wrong_sign in (("e-", -1.0), ("mu-", 1.0)):
        d = torch.tensor(delta[p], dtype=torch.float64)
        n = d.numel()
        k = int((d * wrong_sign > 0).sum())
        er = torch.tensor(e_res[p], dtype=torch.float64)
        out[p] = {
            "n_events": n + failed[p],
            "n_ok": n,
            "n_failed": failed[p],
            "n_misidentified": k,
            "misid_rate": k / n if n else float("nan"),
            "misid_upper_90cl": binomial_upper_limit(k, n) if n else float("nan"),
            "delta_quantiles": {f"{q:.2f}": float(torch.quantile(d, q)) for q in qs} if n else {},
            "min_margin_abs_delta": float((d * -wrong_sign).min()) if n else float("nan"),
            "energy_bias_frac_true_hypothesis": float(er.mean()) if n else float("nan"),
            "energy_68_frac_true_hypothesis": float(torch.quantile(er.abs(), 0.68)) if n else float("nan"),
            "fit_seconds_per_event_both_hypotheses": fit_s[p] / max(n + failed[p], 1),
        }
    write_json(
        "pid",
        {
            "description": "e/mu likelihood-ratio PID, 500 MeV, WCTE-like, contained, DIRECT LIGHT ONLY "
            "(reflection and Rayleigh scattering off in the simulation). "
            "Delta = NLL_mu - NLL_e (> 0: e-like).",
            "settings": {
                "energy_mev": 500.0,
                "max_iter": a.max_iter,
                "n_starts": 1,
                "dtype": "float32",
                "uncertainties": False,
                "chunk": a.chunk,
                "threads": a.threads,
                "e_depth_nodes": 24,
                "mu_track_nodes": 32,
            },
            "results": out,
            "simulation_seconds": sim_s,
            "wall_seconds": time.perf_counter() - t_all,
        },
    )


if __name__ == "__main__":
    main()
