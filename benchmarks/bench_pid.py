"""e/mu identification benchmark: misidentification rates, Delta distributions, time per event.

Events: 500 MeV e- and mu- in the WCTE-like detector (r 2 m, h 4 m), vertex |x|,|y| < 0.4 m, |z| in
[0.9, 1.2] m on one end cap's side, direction within 30 deg of the tank axis pointing to the far end, so a
500 MeV muon (CSDA range ~2.3 m) stops inside and an electron cascade is contained. By default DIRECT LIGHT
ONLY: wall/PMT reflection and Rayleigh scattering switched off in the simulation, the physics responses
(fitting.response.PhysicsResponse) direct light only (writes pid.json). ``--full-optics N``: the detector's
reflection and Rayleigh scattering on in the simulation, and each hypothesis' response adds its expected
scattered and reflected light as a frozen per-PMT template of N traced photons per event (writes
pid_full_optics.json; ``--indirect-off``: the same events fitted with direct-light responses,
pid_full_optics_control.json).

Each event is fitted under both hypotheses by fitting.pid.identify (common pre-fit, per-hypothesis energy
seed, L-BFGS, float32, 1 start, no Hessian). Delta = NLL_mu - NLL_e; misID(e) = P(Delta < 0 | e),
misID(mu) = P(Delta > 0 | mu), with one-sided 90% Clopper-Pearson upper limits. Events are produced in
chunks of ``--chunk`` e + ``--chunk`` mu (seeds 1000 + 2i, 1001 + 2i for chunk i, from ``--first-chunk``)
until ``--budget-s`` of wall time is spent or ``--max-events`` per type are done. The JSON keeps every
event (Delta, null when the event failed; status bits; fitted/true energy - 1), so runs over disjoint
chunks (parallel processes) are combined by ``--merge A.json B.json ...`` (written under ``--name``).
Usage: python benchmarks/bench_pid.py [--budget-s 540] [--max-events 400] [--chunk 8] [--threads 1]
    [--full-optics N [--indirect-off]] [--first-chunk K] [--name NAME] | --merge A.json B.json --name NAME
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import write_json  # noqa: E402
from fitting.pid import binomial_upper_limit, contained_sample, identify, sample_models  # noqa: E402

QUANTILES = [0.0, 0.01, 0.05, 0.16, 0.5, 0.84, 0.95, 0.99, 1.0]


def summarise(events: dict) -> dict:
    """Misidentification rates, Delta quantiles and energy residuals per true particle from the per-event
    records {particle: {"delta": [float | None], "status": [int], "energy_frac": [float | None],
    "fit_seconds": float}} (None: the event's fit failed)."""
    out = {}
    for p, wrong_sign in (("e-", -1.0), ("mu-", 1.0)):
        ev = events[p]
        n_all = len(ev["delta"])
        d = torch.tensor([x for x in ev["delta"] if x is not None], dtype=torch.float64)
        er = torch.tensor([x for x in ev["energy_frac"] if x is not None], dtype=torch.float64)
        n = d.numel()
        k = int((d * wrong_sign > 0).sum())
        failed_status = sorted({s for x, s in zip(ev["delta"], ev["status"], strict=True) if x is None})
        out[p] = {
            "n_events": n_all,
            "n_ok": n,
            "n_failed": n_all - n,
            "failed_status_bits": failed_status,
            "n_misidentified": k,
            "misid_rate": k / n if n else math.nan,
            "misid_upper_90cl": binomial_upper_limit(k, n) if n else math.nan,
            "delta_quantiles": {f"{q:.2f}": float(torch.quantile(d, q)) for q in QUANTILES} if n else {},
            "min_margin_abs_delta": float((d * -wrong_sign).min()) if n else math.nan,
            "energy_bias_frac_true_hypothesis": float(er.mean()) if n else math.nan,
            "energy_68_frac_true_hypothesis": float(torch.quantile(er.abs(), 0.68)) if n else math.nan,
            "fit_seconds_per_event_both_hypotheses": ev["fit_seconds"] / max(n_all, 1),
        }
    return out


def run(a: argparse.Namespace) -> dict:
    full = a.full_optics > 0
    n_ind = a.full_optics if full and not a.indirect_off else 0
    torch.set_num_threads(a.threads)
    events = {p: {"delta": [], "status": [], "energy_frac": [], "fit_seconds": 0.0} for p in ("e-", "mu-")}
    sim_s = 0.0
    t_all = time.perf_counter()
    i = a.first_chunk
    while time.perf_counter() - t_all < a.budget_s and len(events["e-"]["delta"]) < a.max_events:
        for k, p in enumerate(("e-", "mu-")):
            t = time.perf_counter()
            sim, res = contained_sample(p, a.chunk, seed=1000 + 2 * i + k, full_optics=full)
            sim_s += time.perf_counter() - t
            resp, like = sample_models(sim, indirect_trace=n_ind)
            r = identify(res["hits"], a.chunk, resp, like, max_iter=a.max_iter, batch_size=a.chunk)
            ev = events[p]
            ev["fit_seconds"] += r["seconds"]
            ok = r["ok"].tolist()
            e_fit = (r["fits"][p]["energy"] / res["truth"]["energy"].double() - 1).tolist()
            ev["delta"] += [float(x) if o else None for x, o in zip(r["delta"].tolist(), ok, strict=True)]
            ev["energy_frac"] += [x if o else None for x, o in zip(e_fit, ok, strict=True)]
            ev["status"] += [int(x) for x in r["status"].tolist()]
        i += 1
        print(
            f"chunks {a.first_chunk}-{i - 1}: e {len(events['e-']['delta'])} "
            f"mu {len(events['mu-']['delta'])} events "
            f"({sum(x is None for e in events.values() for x in e['delta'])} failed), "
            f"{time.perf_counter() - t_all:.0f} s",
            flush=True,
        )
    if not full:
        what = "DIRECT LIGHT ONLY (reflection and Rayleigh scattering off in the simulation)"
    elif n_ind:
        what = (
            "reflection and Rayleigh scattering on in the simulation; the responses with the expected "
            f"indirect light as a frozen template of {n_ind} traced photons per event"
        )
    else:
        what = "reflection and Rayleigh scattering on in the simulation; direct-light responses (control)"
    return {
        "description": f"e/mu likelihood-ratio PID, 500 MeV, WCTE-like, contained, {what}. "
        "Delta = NLL_mu - NLL_e (> 0: e-like).",
        "settings": {
            "full_optics": full,
            "indirect_n_trace": n_ind,
            "energy_mev": 500.0,
            "max_iter": a.max_iter,
            "n_starts": 1,
            "dtype": "float32",
            "uncertainties": False,
            "chunk": a.chunk,
            "chunks": [a.first_chunk, i],
            "threads": a.threads,
            "e_depth_nodes": 24,
            "mu_track_nodes": 32,
        },
        "results": summarise(events),
        "events": events,
        "simulation_seconds": sim_s,
        "wall_seconds": time.perf_counter() - t_all,
    }


def merge(paths: list[str]) -> dict:
    """Combine runs over disjoint chunks (same settings apart from the chunk range)."""
    runs = [json.loads(Path(x).read_text()) for x in paths]
    keep = [{k: v for k, v in r["settings"].items() if k not in ("chunks", "threads")} for r in runs]
    if any(s != keep[0] for s in keep):
        raise SystemExit(f"--merge: the runs' settings differ: {keep}")
    spans = sorted(tuple(r["settings"]["chunks"]) for r in runs)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise SystemExit(f"--merge: the runs' chunk ranges overlap: {spans}")
    events = {
        p: {
            "delta": [x for r in runs for x in r["events"][p]["delta"]],
            "status": [x for r in runs for x in r["events"][p]["status"]],
            "energy_frac": [x for r in runs for x in r["events"][p]["energy_frac"]],
            "fit_seconds": sum(r["events"][p]["fit_seconds"] for r in runs),
        }
        for p in ("e-", "mu-")
    }
    return {
        "description": runs[0]["description"] + f" Merged from {len(runs)} runs: {paths}.",
        "settings": {
            **runs[0]["settings"],
            "chunks": spans,
            "threads": [r["settings"]["threads"] for r in runs],
        },
        "results": summarise(events),
        "events": events,
        "simulation_seconds": sum(r["simulation_seconds"] for r in runs),
        "wall_seconds": [r["wall_seconds"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--max-events", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full-optics", type=int, default=0, metavar="N")
    ap.add_argument("--indirect-off", action="store_true")
    ap.add_argument("--first-chunk", type=int, default=0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON")
    a = ap.parse_args()
    if a.merge:
        if a.name is None:
            raise SystemExit("--merge needs --name for the combined file")
        write_json(a.name, merge(a.merge))
        return
    name = a.name or (
        "pid" if a.full_optics <= 0 else ("pid_full_optics_control" if a.indirect_off else "pid_full_optics")
    )
    write_json(name, run(a))


if __name__ == "__main__":
    main()
