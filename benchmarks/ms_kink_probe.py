"""Probe: the reconstruction's response to one deterministic multiple-scattering kink (MC, MS otherwise off).

500 MeV mu- in WCTE from (0, 0, -1.2) m along (0.2, 0.1, 1), direct light only. The MC track
(physics.emission.track_steps, multiple_scattering=False) is rotated by ``--kappa`` rad about the kink point
at path length s_k (0.25, 0.6, 1.0, 1.5 m) towards the transverse axis u1
(fitting.uncertainty.tangent_basis); ``--per`` events per s_k plus as many unkinked reference events.
Prints/stores the mean fitted transverse vertex offset a1 and angle b1 along u1 (with standard errors), the
longitudinal vertex shift and log E, next to the straight-line (weighted least-squares) prediction of
fitting.uncertainty ('likelihood' weighting).
Writes benchmarks/results/ms_kink_probe.json. Usage: python benchmarks/ms_kink_probe.py [--per 5]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import physics.simulate as psim  # noqa: E402
from benchmarks._util import write_json  # noqa: E402
from fitting.likelihood import HitLikelihood  # noqa: E402
from fitting.reconstruct import reconstruct  # noqa: E402
from fitting.response import PhysicsResponse  # noqa: E402
from fitting.uncertainty import tangent_basis, track_fit_weights  # noqa: E402
from physics.emission import track_steps  # noqa: E402
from physics.records import TrackSteps  # noqa: E402
from physics.simulate import SimConfig, Simulator  # noqa: E402

F64 = torch.float64
S_K = (0.25, 0.6, 1.0, 1.5)
VTX, DIR = (0.0, 0.0, -1.2), (0.2, 0.1, 1.0)


def kinked_steps(kinks: Tensor, kappa: float, d0: Tensor, u1: Tensor):
    """track_steps without MS, rotated by kappa (towards u1) after s = kinks[event] (< 0: no kink)."""
    axis = torch.linalg.cross(d0, u1)

    def rot(w: Tensor) -> Tensor:  # Rodrigues rotation about ``axis`` by kappa
        c, s = math.cos(kappa), math.sin(kappa)
        return w * c + torch.linalg.cross(axis.expand_as(w), w) * s + axis * (w @ axis)[:, None] * (1 - c)

    def fn(particle, energy, vertex, direction, medium, gen, **kw):
        kw["multiple_scattering"] = False
        st = track_steps(particle, energy, vertex, direction, medium, gen, **kw)
        x0, x1 = st.x0.double(), st.x1.double()
        v = vertex.double()[st.event]
        sk = kinks[st.event][:, None]
        s0 = ((x0 - v) * d0).sum(-1, keepdim=True)
        xk = v + sk * d0
        after = (sk >= 0) & (s0 >= sk)
        x0n = torch.where(after, xk + rot(x0 - xk), x0)
        x1n = torch.where(after, xk + rot(x1 - xk), x1)
        return TrackSteps(
            x0=x0n.to(st.x0.dtype),
            x1=x1n.to(st.x1.dtype),
            beta0=st.beta0,
            beta1=st.beta1,
            t0=st.t0,
            n_photons=st.n_photons,
            event=st.event,
        )

    return fn


def gls_prediction(sim, d0: Tensor, kappa: float) -> dict[str, list[float]]:
    det = sim.detector
    f = track_fit_weights(
        torch.tensor([VTX], dtype=F64),
        d0[None],
        torch.tensor([500.0], dtype=F64),
        particle="mu-",
        medium=sim.medium,
        wall=(det.shape, det.radius, det.height),
        pmt_radius=float(det.pmt_radius.double().mean()),
        detection=sim.sensors.quantum_efficiency,
    )
    s, w, met = f["s"][0], f["w"][0], f["metric"][0]
    k = s.shape[0]
    jac = torch.zeros(k, 4, 4, dtype=F64)
    jac[:, 0, 0] = jac[:, 1, 1] = jac[:, 2, 2] = jac[:, 3, 3] = 1.0
    jac[:, 0, 2] = s
    jac[:, 1, 3] = s
    a = w[:, None, None] * (jac.transpose(1, 2) @ met)
    n_mat = (a @ jac).sum(0)
    out = {"a1": [], "b1": []}
    for sk in S_K:
        y = torch.zeros(k, 4, dtype=F64)
        y[:, 0] = (s - sk) * (s > sk)
        y[:, 2] = (s > sk).double()
        g = torch.linalg.solve(n_mat, (a @ y[..., None])[..., 0].sum(0))
        out["a1"].append(kappa * float(g[0]))
        out["b1"].append(kappa * float(g[2]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per", type=int, default=5)
    ap.add_argument("--kappa", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d0 = torch.tensor(DIR, dtype=F64)
    d0 = d0 / d0.norm()
    u1 = tangent_basis(d0[None])[0][0]
    kinks = torch.tensor([-1.0] * args.per + [s for s in S_K for _ in range(args.per)], dtype=F64)
    psim.track_steps = kinked_steps(kinks, args.kappa, d0, u1)
    cfg = SimConfig(
        detector="wcte",
        particle="mu-",
        energy=500.0,
        vertex=VTX,
        direction=DIR,
        optics={"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0},
    )
    sim = Simulator(cfg)
    sim.medium.rayleigh_scale.data.fill_(math.inf)
    n = kinks.numel()
    res = sim.run(n, seed=args.seed, batch_size=n)
    resp = PhysicsResponse(
        sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    like = HitLikelihood(**resp.likelihood_config(), window=cfg.dark_window_ns)
    fit = reconstruct(
        res["hits"], n, resp, like, "mu-", n_starts=2, batch_size=16, max_iter=50, dtype=torch.float32
    )
    dv = fit["vertex"] - torch.tensor(VTX, dtype=F64)
    cols = {
        "a1": (dv * u1).sum(-1),
        "b1": (fit["direction"] * u1).sum(-1),
        "dz": (dv * d0).sum(-1),
        "dlogE": torch.log(fit["energy"] / 500.0),
    }
    rows = []
    for s in (-1.0,) + S_K:
        m = (kinks == s) & fit["ok"]
        row = {"s_k": s, "n": int(m.sum())}
        for k, x in cols.items():
            row[k] = float(x[m].mean())
            row[k + "_err"] = float(x[m].std() / math.sqrt(max(int(m.sum()), 1)))
        rows.append(row)
        print(" ".join(f"{k} {v:+.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    pred = gls_prediction(sim, d0, args.kappa)
    print(f"GLS prediction (per kink, s_k = {S_K}): a1 {pred['a1']} b1 {pred['b1']}")
    write_json(
        "ms_kink_probe", {"kappa_rad": args.kappa, "seed": args.seed, "rows": rows, "gls_prediction": pred}
    )


if __name__ == "__main__":
    main()
