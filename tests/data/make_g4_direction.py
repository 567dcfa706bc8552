"""Derive tests/data/g4_direction.json: per-event mean Cherenkov photon direction at creation, Geant4.

Why: the 20 shared tracked events (mu500_tracked.h5) put the ring's azimuth about 2 sigma from ours (mean
photon dy 0.169 +- 0.006 vs 0.154 +- 0.002). Multiple scattering moves the whole ring event by event, so
this needs many events: 300 fresh Geant4 events of the same source settle it.

Geant4 11.4.p01 (geant4-pybind 0.1.3) through ``shared/tools/g4_reference.py``: 500 MeV mu- from
(1000, -500, -2000) mm along (0.3, 0.2, 0.933), G4_WATER cylinder r = 5 m, half-height 5 m, dispersive
n(lambda) 300-600 nm, G4EmStandardPhysics (option 0) + G4OpticalPhysics, delta rays off, photons recorded at
creation (2,000 kept at random per event), seed 11, 300 events. Written: per event the mean photon
direction (dx, dy, dz) of the kept photons and the photon count.

Run (needs geant4-pybind; about 3 minutes on 2 cores):
    python tests/data/make_g4_direction.py /path/to/g4_reference.py [workdir]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

OUT = Path(__file__).with_name("g4_direction.json")


def main() -> None:
    tool = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/tools/g4_reference.py")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    h5 = work / "mu500_dir300.h5"
    if not h5.exists():
        subprocess.run(
            [
                sys.executable,
                str(tool),
                "--n-events",
                "300",
                "--energy-mev",
                "500",
                "--direction",
                "0.3",
                "0.2",
                "0.933",
                "--vertex-mm",
                "1000",
                "-500",
                "-2000",
                "--radius-m",
                "5",
                "--half-height-m",
                "5",
                "--abs-length-m",
                "30",
                "--rayleigh-length-m",
                "60",
                "--max-store",
                "2000",
                "--seed",
                "11",
                "-o",
                str(h5),
            ],
            check=True,
        )
    with h5py.File(h5) as f:
        ev = f["photons/event"][:]
        d = np.stack([f["photons/" + k][:] for k in ("dx", "dy", "dz")], 1).astype(np.float64)
        n_photons = f["events/n_photons"][:]
    cnt = np.bincount(ev)
    mean_dir = np.stack([np.bincount(ev, d[:, k]) for k in range(3)], 1) / cnt[:, None]
    out = {
        "provenance": __doc__.split("Run (")[0].strip(),
        "config": {
            "particle": "mu-",
            "energy_mev": 500.0,
            "vertex_m": [1.0, -0.5, -2.0],
            "direction": [0.3, 0.2, 0.933],
        },
        "n_events": len(cnt),
        "mean_dir_per_event": np.round(mean_dir, 6).tolist(),
        "n_photons_per_event": n_photons.astype(int).tolist(),
    }
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out) + "\n")
    os.replace(tmp, OUT)
    print(mean_dir.mean(0), mean_dir.std(0, ddof=1) / np.sqrt(len(mean_dir)))


if __name__ == "__main__":
    main()
