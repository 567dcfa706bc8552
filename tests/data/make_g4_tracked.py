"""Derive tests/data/g4_tracked.json from the Geant4 tracked-photon reference run.

Source: /work/shared/reference/geant4/mu500_tracked.h5 (Geant4 11.4.p01 via geant4-pybind 0.1.3, made by
shared/tools/g4_reference.py --track-photons): 20 events of a 500 MeV mu- from (1000, -500, -2000) mm along
(0.3, 0.2, 0.933) in G4_WATER (dispersive n(lambda) table, absorption 30 m and Rayleigh 60 m constant) inside
a black-walled cylinder r = 5 m, half-height 5 m. ``hits/*`` is a random 40 % of all wall arrivals,
``photons/*`` a random 5,000 emitted photons per event (at creation).

Written (lengths in m, times ns, wavelengths nm):
* ``config`` / ``tables``: the run configuration and the optical tables Geant4 used;
* ``wall_fraction``: sum(n_hits) / sum(n_photons) over the 20 events (every photon either is absorbed or
  reaches the wall) with its error from the event-to-event spread (std / sqrt(n_events));
* ``hist``: wall-hit histograms from all 407,371 stored hits (counts + edges; shapes are counts/total):
  time t, barrel z, barrel phi, top-cap r^2 (equal-area bins), the surface split (barrel/top/bottom) and the
  scattered share (direction at the wall != direction at emission); also per event (``per_event``), because
  event-to-event fluctuations of the muon track dominate the spread between different events;
* ``direct``: 600 unscattered hits (emission point, direction, time, wavelength -> wall point, time) for a
  per-photon check of ray geometry and group velocity;
* ``photons``: 10,000 emitted photons drawn at random from ``photons/*`` (position, direction, time,
  wavelength, and the Cherenkov linear polarisation rebuilt from the emitting step as G4Cerenkov sets it):
  input for an emission-independent optics comparison.

Run: python tests/data/make_g4_tracked.py [path/to/mu500_tracked.h5]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np

SRC = Path("/work/shared/reference/geant4/mu500_tracked.h5")
OUT = Path(__file__).with_name("g4_tracked.json")

T_EDGES = np.concatenate([np.arange(14.0, 60.0, 2.0), [60.0, 70.0, 90.0, 130.0]])
Z_EDGES = np.linspace(-5.0, 5.0, 21)
PHI_EDGES = np.linspace(-np.pi, np.pi, 25)
R2_EDGES = np.linspace(0.0, 25.0, 11)  # top cap, r^2 [m^2]: equal-area bins
EPS_SURF = 1e-5  # m: a hit is on a cap if |z| > 5 m - EPS_SURF


def rnd(a, nd):
    return [round(float(v), nd) for v in np.asarray(a).ravel()]


def main(src: Path) -> None:
    f = h5py.File(src, "r")
    cfg = json.loads(f.attrs["config"])
    ev = {k: f["events"][k][:] for k in ("n_photons", "n_hits", "cpu_s")}
    h = {k: f["hits"][k][:] for k in f["hits"]}
    p = {k: f["photons"][k][:] for k in f["photons"]}
    tables = {k: f["tables"][k][:].tolist() for k in f["tables"]}

    n_ph, n_hit = ev["n_photons"].astype(float), ev["n_hits"].astype(float)
    frac_ev = n_hit / n_ph
    wall_fraction = dict(
        value=float(n_hit.sum() / n_ph.sum()),
        error=float(frac_ev.std(ddof=1) / np.sqrt(len(frac_ev))),
        binomial_error=float(np.sqrt(frac_ev.mean() * (1 - frac_ev.mean()) / n_ph.sum())),
        n_photons=ev["n_photons"].tolist(),
        n_hits=ev["n_hits"].tolist(),
        stored_hit_fraction=float(len(h["t"]) / n_hit.sum()),
    )

    x, y, z = h["x"] / 1e3, h["y"] / 1e3, h["z"] / 1e3
    r = np.hypot(x, y)
    half = cfg["half_height_m"]
    top, bot = z > half - EPS_SURF, z < -half + EPS_SURF
    bar = ~top & ~bot
    d = np.stack([h["dx"], h["dy"], h["dz"]], 1).astype(float)
    de = np.stack([h["dx_emit"], h["dy_emit"], h["dz_emit"]], 1).astype(float)
    cosd = (d * de).sum(1)
    scattered = cosd < 1 - 1e-6

    def hist(v, edges):
        return np.histogram(v, edges)[0].tolist()

    hev = h["event"]
    n_ev = int(cfg["n_events"])

    def per_event(v, sel, edges):
        """(n_events, bins) counts: the event-to-event spread (muon multiple scattering, straggling) is
        far larger than Poisson, so comparisons with other events need it."""
        return [np.histogram(v[sel & (hev == e)], edges)[0].tolist() for e in range(n_ev)]

    t = np.clip(h["t"], T_EDGES[0], T_EDGES[-1] - 1e-9)
    phi = np.arctan2(y, x)
    surf = np.where(bar, 0, np.where(top, 1, 2)).astype(float)
    s_edges = np.array([-0.5, 0.5, 1.5, 2.5])
    every = np.ones(len(t), bool)
    hist_out = dict(
        n_total=int(len(t)),
        t=dict(edges=T_EDGES.tolist(), counts=hist(t, T_EDGES), per_event=per_event(t, every, T_EDGES)),
        barrel_z=dict(
            edges=Z_EDGES.tolist(), counts=hist(z[bar], Z_EDGES), per_event=per_event(z, bar, Z_EDGES)
        ),
        barrel_phi=dict(
            edges=PHI_EDGES.tolist(),
            counts=hist(phi[bar], PHI_EDGES),
            per_event=per_event(phi, bar, PHI_EDGES),
        ),
        top_r2=dict(
            edges=R2_EDGES.tolist(),
            counts=hist(r[top] ** 2, R2_EDGES),
            per_event=per_event(r**2, top, R2_EDGES),
        ),
        surface=dict(
            names=["barrel", "top", "bottom"],
            counts=[int(bar.sum()), int(top.sum()), int(bot.sum())],
            per_event=per_event(surf, every, s_edges),
        ),
        scattered=dict(
            count=int(scattered.sum()),
            total=int(len(t)),
            per_event=[int((scattered & (hev == e)).sum()) for e in range(n_ev)],
        ),
    )

    rng = np.random.default_rng(12345)
    di = np.sort(rng.choice(np.nonzero(~scattered)[0], 600, replace=False))
    direct = dict(
        x_emit=rnd(np.stack([h["x_emit"][di], h["y_emit"][di], h["z_emit"][di]], 1) / 1e3, 7),
        dir_emit=rnd(de[di], 7),
        t_emit=rnd(h["t_emit"][di], 5),
        wavelength=rnd(h["wavelength_nm"][di], 3),
        x_wall=rnd(np.stack([x[di], y[di], z[di]], 1), 7),
        t_wall=rnd(t[di], 5),
    )

    pi = np.sort(rng.choice(len(p["t"]), 10000, replace=False))
    # Geant4's Cherenkov polarisation (G4Cerenkov): e = -(u - (u.k) k)/|...| with u the emitting step's
    # direction (photons/step is the global row of steps/*) and k the photon direction.
    st = {k: f["steps"][k][:] for k in ("x0", "y0", "z0", "x1", "y1", "z1")}
    si = p["step"][pi]
    u = np.stack([st["x1"][si] - st["x0"][si], st["y1"][si] - st["y0"][si], st["z1"][si] - st["z0"][si]], 1)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    k = np.stack([p["dx"][pi], p["dy"][pi], p["dz"][pi]], 1).astype(float)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    pol = -(u - (u * k).sum(1, keepdims=True) * k)
    pol /= np.linalg.norm(pol, axis=1, keepdims=True)
    photons = dict(
        pos=rnd(np.stack([p["x"][pi], p["y"][pi], p["z"][pi]], 1) / 1e3, 4),
        pol=rnd(pol, 4),
        dir=rnd(np.stack([p["dx"][pi], p["dy"][pi], p["dz"][pi]], 1), 5),
        t=rnd(p["t"][pi], 3),
        wavelength=rnd(p["wavelength_nm"][pi], 2),
    )

    out = dict(
        provenance=(
            "derived by tests/data/make_g4_tracked.py from shared/reference/geant4/mu500_tracked.h5 "
            f"({cfg['geant4_version']}, seed {cfg['seed']}); lengths m, times ns, wavelengths nm"
        ),
        config=dict(
            particle=cfg["particle"],
            energy_mev=cfg["energy_mev"],
            vertex_m=[v / 1e3 for v in cfg["vertex_mm"]],
            direction=cfg["direction"],
            radius_m=cfg["radius_m"],
            half_height_m=half,
            abs_length_m=cfg["abs_length_m"],
            rayleigh_length_m=cfg["rayleigh_length_m"],
            wl_min=cfg["wl_min"],
            wl_max=cfg["wl_max"],
            n_events=cfg["n_events"],
        ),
        tables=tables,
        geant4_cpu_s_per_event=dict(mean=float(ev["cpu_s"].mean()), readme_quote=1.44),
        wall_fraction=wall_fraction,
        hist=hist_out,
        direct=direct,
        photons=photons,
    )
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, separators=(",", ":")))
    os.replace(tmp, OUT)
    print(
        f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB): fraction {wall_fraction['value']:.5f} "
        f"+- {wall_fraction['error']:.5f}, scattered share {scattered.mean():.4f}, "
        f"surfaces {hist_out['surface']['counts']}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
