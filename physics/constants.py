"""Physical constants (PDG 2024, Review of Particle Physics, "Physical constants" table).

Units: m, ns, MeV, nm.
"""

from __future__ import annotations

C_M_PER_NS = 0.299792458  # speed of light in vacuum [m/ns]
ALPHA = 1.0 / 137.035999084  # fine-structure constant
HBARC_EV_NM = 197.3269804  # hbar*c [eV nm]
HC_EV_NM = 1239.84198  # h*c [eV nm]: photon energy [eV] = HC_EV_NM / wavelength [nm]
ELECTRON_MASS = 0.51099895  # [MeV]
MUON_MASS = 105.6583755  # [MeV]
PION_MASS = 139.57039  # charged pion [MeV]
PROTON_MASS = 938.27208816  # [MeV]
K_BETHE = 0.307075  # 4 pi N_A r_e^2 m_e c^2 [MeV cm^2 / mol]

PARTICLE_MASS = {
    "mu-": MUON_MASS,
    "mu+": MUON_MASS,
    "pi-": PION_MASS,
    "pi+": PION_MASS,
    "e-": ELECTRON_MASS,
    "e+": ELECTRON_MASS,
    "gamma": 0.0,
}
TRACK_PARTICLES = ("mu-", "mu+", "pi-", "pi+")
SHOWER_PARTICLES = ("e-", "e+", "gamma")
