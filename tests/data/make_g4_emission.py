"""Derive the small Geant4 reference numbers used by tests/test_emission.py.

Source: Geant4 11.4.p01 runs made by shared/tools/g4_reference.py (G4EmStandardPhysics + G4OpticalPhysics,
500 MeV mu- in G4_WATER, delta rays off, 300-600 nm, 10 % max beta change, <= 100 photons/step), files
shared/reference/geant4/mu500_water_n_lambda.h5 (dispersive Sellmeier water, 200 events) and
mu500_water_n133.h5 (n = 1.33, 100 events). Usage:

    python tests/data/make_g4_emission.py /work/shared/reference/geant4 tests/data/g4_emission.json

Lengths in the JSON are in cm, angles in degrees. Standard errors of photon-level means are computed from the
per-event means (photons of one event share the muon's multiple scattering, so they are not independent).
"""

from __future__ import annotations

import json
import os
import sys

import h5py
import numpy as np

BETA_EDGES = [0.74, 0.80, 0.85, 0.90, 0.94, 0.97, 0.98, 0.99]


def summarise(path: str) -> dict:
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["config"])
        ev = {
            k: f[f"events/{k}"][()] for k in ("n_photons", "muon_track_length", "muon_track_length_radiating")
        }
        st = {k: f[f"steps/{k}"][()] for k in ("beta0", "beta1", "length", "n_photons", "track_id", "event")}
        ph = {
            k: f[f"photons/{k}"][()] for k in ("dz", "cos_step", "wavelength_nm", "event", "parent_track_id")
        }
    n_ev = len(ev["n_photons"])
    nph = ev["n_photons"].astype(float)
    trk = ev["muon_track_length"].astype(float) / 10.0  # mm -> cm
    out = {
        "source": os.path.basename(path),
        "config": {
            k: cfg[k]
            for k in (
                "particle",
                "energy_mev",
                "rindex",
                "n_const",
                "wl_min",
                "wl_max",
                "max_beta_change",
                "max_photons_per_step",
                "deltas",
                "seed",
            )
        },
        "n_events": n_ev,
        "photons_per_event": {
            "mean": nph.mean(),
            "std": nph.std(ddof=1),
            "sem": nph.std(ddof=1) / np.sqrt(n_ev),
        },
        "muon_track_length_cm": {
            "mean": trk.mean(),
            "std": trk.std(ddof=1),
            "sem": trk.std(ddof=1) / np.sqrt(n_ev),
        },
        "muon_radiating_length_cm": float(ev["muon_track_length_radiating"].mean() / 10.0),
    }
    mu = st["track_id"] == 1
    bavg = 0.5 * (st["beta0"][mu].astype(float) + st["beta1"][mu].astype(float))
    ln = st["length"][mu].astype(float) / 10.0
    nst = st["n_photons"][mu].astype(float)
    bins = []
    for lo, hi in zip(BETA_EDGES[:-1], BETA_EDGES[1:], strict=True):
        s = (bavg >= lo) & (bavg < hi)
        if s.sum() < 5:
            continue
        bins.append(
            {
                "beta_lo": lo,
                "beta_hi": hi,
                "n_steps": int(s.sum()),
                "photons": float(nst[s].sum()),
                "length_cm": float(ln[s].sum()),
                "per_cm": float(nst[s].sum() / ln[s].sum()),
                "per_cm_err": float(np.sqrt(nst[s].sum()) / ln[s].sum()),
                "mean_beta": float(bavg[s].mean()),
            }
        )
    out["per_cm_in_beta_bins"] = bins
    frommu = ph["parent_track_id"] == 1
    thz = np.degrees(np.arccos(np.clip(ph["dz"][frommu].astype(float), -1, 1)))
    ths = np.degrees(np.arccos(np.clip(ph["cos_step"][frommu].astype(float), -1, 1)))
    evs = ph["event"][frommu]
    per_ev = np.array([thz[evs == e].mean() for e in np.unique(evs)])
    per_ev_std = np.array([thz[evs == e].std() for e in np.unique(evs)])
    out["theta_initial_dir_deg"] = {
        "mean": thz.mean(),
        "std": thz.std(),
        "sem": per_ev.std(ddof=1) / np.sqrt(len(per_ev)),
        "std_sem": per_ev_std.std(ddof=1) / np.sqrt(len(per_ev)),
        "n_photons": int(frommu.sum()),
    }
    out["theta_step_dir_deg"] = {"mean": ths.mean(), "std": ths.std()}
    out["wavelength_mean_nm"] = float(ph["wavelength_nm"][frommu].astype(float).mean())
    return json.loads(json.dumps(out, default=float))


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference/geant4"
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "g4_emission.json")
    data = {
        "provenance": "Geant4 11.4.p01 via shared/tools/g4_reference.py; "
        "derived by tests/data/make_g4_emission.py",
        "units": {"length": "cm", "angle": "deg", "wavelength": "nm", "energy": "MeV"},
        "mu500_water_n_lambda": summarise(os.path.join(src, "mu500_water_n_lambda.h5")),
        "mu500_water_n133": summarise(os.path.join(src, "mu500_water_n133.h5")),
    }
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, dst)
    print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
