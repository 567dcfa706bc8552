"""MC vs model per-PMT hit probability, mean light and over-dispersion by ring angle (multiple scattering).

Events: the closure muons (``bench_closure_pulls.closure_simulator``: 500 MeV mu- along (0.2, 0.1, 1), direct
light only, Highland multiple scattering in the MC) in WCTE or SK (``--detector``), all at one truth. Per
3-degree bin of the angle between the true direction and the vertex -> PMT line, summed over the bin's PMTs:

* the MC's hit fraction against the model's P(hit) at the truth, with Poisson counts of the smeared mean
  (``PhysicsResponse.expected``) and with the negative binomial of ``ms_relative_variance``
  (``--ms-samples`` kink sets, ``--ms-seed``): the clumping of a sharp ring that moves from event to event;
* the MC's mean charge less dark noise, with the standard error of the bin's per-event sum (the ring moves
  as a whole with the track's kinks, so a bin's PMTs fluctuate together: at SK's outer ring edge the sum's
  event-to-event spread is 80 % of its mean), against the smeared mean mu;
* the excess count variance V = Var(q) - E[q] (1 + v_spe) of the MC (q: charge, g = 1; v_spe the single-p.e.
  relative variance) against the model's w mu^2;
* ``--kink-events N``: N more MC events whose own tracks (their recorded steps, as node offsets of the fit's
  K nodes, ``ms_fit_response.node_offsets``) are evaluated with sharp rings: the mean and variance over
  those events of mu. That is the kink model with the MC's kinks instead of the sampled sets; its
  difference from the MC on the same events is what the node representation of the track leaves out.

Writes benchmarks/results/ms_overdispersion_<detector>.json.
Usage: python benchmarks/ms_overdispersion.py [--detector wcte|sk] [--events 2000] [--ms-samples 16]
    [--ms-seed 0] [--kink-events 192] [--track-nodes 32] [--threads 2]
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
from benchmarks.bench_closure_pulls import DIRECTION, VERTICES, closure_simulator, fit_model  # noqa: E402
from benchmarks.ms_fit_response import node_offsets  # noqa: E402
from fitting.likelihood import unhit_log_prob  # noqa: E402

F64 = torch.float64
EDGES = list(range(0, 57, 3)) + [90, 180]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="sk", choices=sorted(VERTICES))
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--ms-samples", type=int, default=16)
    ap.add_argument("--ms-seed", type=int, default=0)
    ap.add_argument("--kink-events", type=int, default=0, help="MC events evaluated with their own kinks")
    ap.add_argument("--track-nodes", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n, det = a.events, a.detector
    sim = closure_simulator(False, detector=det)
    n_pmt = sim.detector.n_pmts
    d = torch.tensor([DIRECTION], dtype=F64)
    d = d / d.norm()
    v = torch.tensor([VERTICES[det]], dtype=F64)
    pos = sim.detector.pmt_pos.double() - v
    ang = torch.rad2deg(torch.acos(((pos @ d[0]) / pos.norm(dim=1)).clamp(-1.0, 1.0)))
    in_bin = torch.stack([(ang >= lo) & (ang < hi) for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True)], 1)
    q1, q2, hits = (torch.zeros(n_pmt, dtype=F64) for _ in range(3))
    bin_sums = []  # (events, bins) charge per event in each bin: the error of the bin's mean light
    for start in range(0, n, 100):
        b = min(100, n - start)
        h = sim.run(b, seed=a.seed + start, batch_size=b)["hits"]
        dense = torch.zeros(b, n_pmt, dtype=F64)
        dense[h.event.long(), h.pmt.long()] = h.charge.double()
        q1 += dense.sum(0)
        q2 += (dense * dense).sum(0)
        hits += (dense != 0).sum(0)
        bin_sums.append(dense @ in_bin.double())
    mu_mc_err = torch.cat(bin_sums).std(0) / math.sqrt(n)
    resp, like = fit_model(sim, a.track_nodes, ms_samples=a.ms_samples)
    resp.ms_seed = a.ms_seed
    resp, like = resp.double(), like.double()
    e0 = torch.tensor([500.0], dtype=F64)
    p = {"vertex": v, "direction": d, "energy": e0, "t0": torch.zeros(1, dtype=F64)}
    cfg = resp.likelihood_config()
    rv, dark = cfg["spe_rel_var"], float(like.mu_dark)
    with torch.no_grad():
        mu = resp.expected(p)["mu"][0]
        w = resp.ms_relative_variance(p)[0]
    m = mu + dark
    p_pois = -torch.expm1(unhit_log_prob(m, rv, cfg["threshold"], 1.0))
    p_nb = -torch.expm1(unhit_log_prob(m, rv, cfg["threshold"], 1.0, w * mu * mu))
    mean_q = q1 / n
    var_q = q2 / n - mean_q * mean_q
    var_mc = var_q - mean_q * (1.0 + rv)
    kink = None
    if a.kink_events:
        kink = kink_model(sim, resp, p, a.kink_events, a.seed + 10**6)
    rows = []
    for i, (lo, hi) in enumerate(zip(EDGES[:-1], EDGES[1:], strict=True)):
        sel = in_bin[:, i]
        f = hits[sel] / n
        r = {
            "angle_deg": [lo, hi],
            "pmts": int(sel.sum()),
            "hits_mc": float(f.sum()),
            "hits_mc_err": math.sqrt(float((f * (1 - f)).sum()) / n),
            "hits_poisson": float(p_pois[sel].sum()),
            "hits_nb": float(p_nb[sel].sum()),
            "mu_mc": float(mean_q[sel].sum()) - dark * int(sel.sum()),
            "mu_mc_err": float(mu_mc_err[i]),
            "mu_model": float(mu[sel].sum()),
            "excess_var_mc": float(var_mc[sel].sum()),
            "excess_var_mc_err": math.sqrt(2.0 * float((var_q[sel] ** 2).sum()) / n),
            "excess_var_nb": float((w * mu * mu)[sel].sum()),
        }
        if kink is not None:
            r["mu_mc_kinks"] = float(kink[0][sel].sum())
            r["excess_var_mc_kinks"] = float(kink[1][sel].sum())
        rows.append(r)
        print(
            f"[{lo:3d},{hi:3d}) hits MC {r['hits_mc']:7.2f} Poisson {r['hits_poisson']:7.2f}"
            f" NB {r['hits_nb']:7.2f}"
            f" | mu MC {r['mu_mc']:7.2f} +- {r['mu_mc_err']:.2f} model {r['mu_model']:7.2f}"
            f" | V MC {r['excess_var_mc']:7.2f} +- {r['excess_var_mc_err']:.2f} NB {r['excess_var_nb']:7.2f}"
            + (f" own kinks {r['excess_var_mc_kinks']:7.2f}" if kink is not None else "")
        )
    tot = {k: sum(r[k] for r in rows) for k in ("hits_mc", "hits_poisson", "hits_nb", "mu_mc", "mu_model")}
    print("totals", {k: round(x, 2) for k, x in tot.items()})
    write_json(
        f"ms_overdispersion_{det}",
        {
            "detector": det,
            "events": n,
            "seed": a.seed,
            "ms_samples": a.ms_samples,
            "ms_seed": a.ms_seed,
            "track_nodes": a.track_nodes,
            "kink_events": a.kink_events,
            "totals": tot,
            "bins": rows,
        },
    )


def kink_model(sim, resp, p: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (P,) over n MC tracks of the sharp-ring expectation of each one's own bent track."""
    kept = []
    orig = psim.track_steps

    def keep(*args, **kw):
        st = orig(*args, **kw)
        kept.append(st)
        return st

    psim.track_steps = keep
    try:
        sim.run(n, seed=seed, batch_size=n)
    finally:
        psim.track_steps = orig
    # s: the nodes' mean positions along the initial direction; the MC track is indexed by path length
    nodes = resp.ms_kinks(p)
    k = nodes["s"].shape[1]
    s, path = nodes["s"].expand(n, k), nodes["path"].expand(n, k)
    d = p["direction"]
    off = node_offsets(kept[-1], path.contiguous(), p["vertex"].expand(n, 3), d.expand(n, 3))
    off[..., :3] += (path - s)[..., None] * d  # node at v + s d + dx = the MC position at its path length
    out = []
    with torch.no_grad():
        for start in range(0, n, 16):
            b = min(16, n - start)
            rep = {key: x.expand(b, *x.shape[1:]) for key, x in p.items()}
            out.append(resp._expected({**rep, "node_offset": off[start : start + b]}, True, b)["mu"])
    mu = torch.cat(out)
    return mu.mean(0), mu.var(0)


if __name__ == "__main__":
    main()
