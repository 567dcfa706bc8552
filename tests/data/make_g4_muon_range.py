"""Derive tests/data/g4_muon_range_water.json: Geant4 mean muon path length in water, 0.2-10 GeV.

Why: the issue asks for the muon CSDA range at 0.2, 0.5, 1, 3 and 10 GeV against the PDG table
(Groom, Mokhov & Striganov 2001, ``muE_water_liquid``). The PDG rows at 0.2/0.4/0.8/1/1.4/2 GeV are in
``pdg_muon_range_water.json``; the 3 and 10 GeV rows were not available offline and the PDG grid has no
500 MeV row. Geant4 is the independent second method for those energies: its mean path length of a
stopping muon equals the CSDA range up to straggling, and this run checks that against the PDG rows it
shares (0.2, 1 and 2 GeV, written into ``pdg_cross_check``).

Geant4 11.4.p01 (geant4-pybind 0.1.3) through ``shared/tools/g4_reference.py``: G4_WATER cylinder r = 10 m,
half-height 30 m, mu- from (0, 0, -29.5) m along +z, G4EmStandardPhysics (option 0): ionisation with
fluctuations, multiple scattering, muon bremsstrahlung, pair production and Coulomb scattering; delta rays
off (production cut at Geant4's 10 GeV cap, so the losses are continuous with straggling); ``--no-stack``
(Cherenkov photons counted, not created); 400 events per energy, seed 7.

Run (needs geant4-pybind; about 2 minutes):
    python tests/data/make_g4_muon_range.py /path/to/g4_reference.py [workdir]
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

ENERGIES_MEV = (200, 500, 1000, 2000, 3000, 10000)
N_EVENTS = 400
OUT = Path(__file__).with_name("g4_muon_range_water.json")


def main() -> None:
    tool = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/tools/g4_reference.py")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    mean, sem, sd = [], [], []
    for e in ENERGIES_MEV:
        h5 = work / f"range_{e}.h5"
        if not h5.exists():
            subprocess.run(
                [
                    sys.executable,
                    str(tool),
                    "--n-events",
                    str(N_EVENTS),
                    "--energy-mev",
                    str(e),
                    "--radius-m",
                    "10",
                    "--half-height-m",
                    "30",
                    "--vertex-mm",
                    "0",
                    "0",
                    "-29500",
                    "--no-stack",
                    "--no-record",
                    "--seed",
                    "7",
                    "-o",
                    str(h5),
                ],
                check=True,
            )
        with h5py.File(h5) as f:
            length_m = f["events/muon_track_length"][:] / 1000.0  # mm -> m
        mean.append(float(length_m.mean()))
        sd.append(float(length_m.std(ddof=1)))
        sem.append(float(length_m.std(ddof=1) / np.sqrt(len(length_m))))
    pdg = json.loads(Path(__file__).with_name("pdg_muon_range_water.json").read_text())
    cross = {}
    for e, m, s in zip(ENERGIES_MEV, mean, sem, strict=True):
        if float(e) in pdg["kinetic_energy_mev"]:
            r = pdg["csda_range_g_cm2"][pdg["kinetic_energy_mev"].index(float(e))] / 100.0
            cross[str(e)] = {
                "pdg_csda_m": r,
                "g4_mean_m": m,
                "g4_over_pdg_minus_1": m / r - 1,
                "sem_rel": s / r,
            }
    out = {
        "provenance": __doc__.split("Run (")[0].strip(),
        "particle": "mu-",
        "n_events": N_EVENTS,
        "kinetic_energy_mev": [float(e) for e in ENERGIES_MEV],
        "mean_path_length_m": mean,
        "sem_m": sem,
        "std_m": sd,
        "pdg_cross_check": cross,
    }
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, OUT)
    print(json.dumps(cross, indent=1))


if __name__ == "__main__":
    main()
