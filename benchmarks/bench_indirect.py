"""Benchmark: time to trace the expected indirect (scattered and reflected) light of a batch of events.

This is the cost of one freeze of the fit's indirect template (``PhysicsResponse.freeze_indirect`` with
``indirect={"n_trace": N, "template": True}``; the reconstruction freezes at the seed, at a wall restart
and at the best fit), i.e. ``physics.indirect.indirect_light`` on N photons per event with next-event
scoring at every PMT. Events: the PID validation sample (``fitting.pid.contained_sample``, WCTE-like,
500 MeV, the detector's optics, Rayleigh on), e- and mu-, float32 and float64; the best of ``--repeat`` runs.
Prints a table and writes benchmarks/results/<name>.json (atomically). Usage:
    python benchmarks/bench_indirect.py [--events 4] [--n-trace 1000] [--repeat 2] [--threads 1]
        [--name indirect]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import write_json  # noqa: E402
from fitting.pid import contained_sample, sample_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=4)
    ap.add_argument("--n-trace", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="indirect")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for particle, seed in (("e-", 60), ("mu-", 61)):
        sim, res = contained_sample(particle, a.events, seed=seed, full_optics=True)
        resp = sample_models(sim, indirect_trace=a.n_trace)[0][particle]
        tr = res["truth"]
        for dtype in (torch.float32, torch.float64):
            p = {k: tr[k].to(dtype) for k in ("vertex", "direction", "energy")}
            p["t0"] = torch.zeros(a.events, dtype=dtype)
            best = float("inf")
            for _ in range(a.repeat):
                t = time.perf_counter()
                resp.freeze_indirect(p)
                best = min(best, time.perf_counter() - t)
            per_yield = resp._frozen["template"]  # (E, P) p.e. per emitted photon (mu-) or per MeV (e-)
            rows.append(
                {
                    "particle": particle,
                    "dtype": str(dtype).removeprefix("torch."),
                    "seconds_per_batch": best,
                    "seconds_per_event": best / a.events,
                    "indirect_pe_per_yield_unit": float(per_yield.sum(1).mean()),
                }
            )
            print(f"{particle} {rows[-1]['dtype']}: {best:.2f} s per {a.events} events", flush=True)
    write_json(
        a.name,
        {
            "description": "one freeze of the indirect-light template (PhysicsResponse.freeze_indirect), "
            "WCTE-like, 500 MeV, full optics; best of repeats; indirect_pe_per_yield_unit: template p.e. "
            "per emitted photon (mu-) or per MeV (e-), summed over PMTs",
            "settings": {"events": a.events, "n_trace": a.n_trace, "repeat": a.repeat, "threads": a.threads},
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
