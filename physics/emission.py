"""Light emission: charged tracks (Cherenkov, scintillation), EM showers and calibration sources.

Units: positions and lengths m, times ns, energies MeV (kinetic energy unless stated), wavelengths nm.
Pure functions, vectorised over events (E) and photons (N); loops run only over track steps, rejection rounds
or photon chunks.

Physics and references:

* Continuous energy loss: Bethe-Bloch mean stopping power with the Sternheimer density effect and, for
  spin-1/2 projectiles, the (1/8)(W_max/E)^2 term (PDG Review of Particle Physics, "Passage of particles
  through matter", eqs. 34.5-34.7; Groom, Mokhov & Striganov, ADNDT 78 (2001) 183). Radiative muon losses
  b(E) E are neglected: in water the muon critical energy is ~1 TeV (Groom et al.), so they are < 1 % of
  dE/dx below 10 GeV. Hadronic interactions of pions are not simulated (pions are ionising tracks only).
* Stepping: steps limited by a maximum length and by a maximum fractional change of beta (Geant4's
  G4Cerenkov MaxBetaChange, 10 %); the energy along the path follows the CSDA range table (no step loop).
* Multiple scattering: Highland's formula (PDG eq. 34.16, Lynch & Dahl NIM B 58 (1991) 6)
  theta0 = 13.6 MeV/(beta c p) z sqrt(x/X0) (1 + 0.038 ln(x z^2 / (X0 beta^2))), applied as Gaussian projected
  deflections between steps. The per-step variance is the increment of theta0^2 along the accumulated path,
  so that the track's total deflection follows Highland for the whole path length (step-size independent).
* Cherenkov light (Frank & Tamm 1937; PDG eq. 34.45): d^2N/dx dlambda = 2 pi alpha z^2 / lambda^2
  (1 - 1/(beta^2 n(lambda)^2)), cos theta = 1/(beta n(lambda)). The mean number per step uses the step-average
  beta (Geant4's G4Cerenkov convention).
* EM showers: longitudinal profile dE/dt = E b (bt)^(a-1) e^(-bt) / Gamma(a), t = x/X0, total Cherenkov track
  length l(E) = alpha E^beta and the cascade's Cherenkov angular distribution
  dN/dcos = a exp(b |cos - 1/n|^c) + d, all from Raedel & Wiebusch, Astropart. Phys. 38 (2012) 53
  (Geant4 simulations in ice), scaled to the medium by density (lengths in g/cm^2). Gammas first travel an
  exponential conversion length of mean 9/7 X0 (PDG eq. 34.31).
* Scintillation: Birks' law dL/dx = Y (dE/dx) / (1 + kB dE/dx), see :class:`physics.medium.Scintillator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, check_choice, check_number
from .constants import (
    ALPHA,
    C_M_PER_NS,
    ELECTRON_MASS,
    K_BETHE,
    PARTICLE_MASS,
    SHOWER_PARTICLES,
    TRACK_PARTICLES,
)
from .medium import Medium, Scintillator, sample_piecewise_linear
from .records import Photons, TrackSteps

__all__ = [
    "bethe_dedx",
    "density_effect",
    "csda_range",
    "range_energy",
    "frank_tamm_yield",
    "cherenkov_threshold_beta",
    "sample_cherenkov_wavelength",
    "track_steps",
    "cherenkov_photons",
    "cherenkov_polarization",
    "iter_cherenkov_photons",
    "shower_params",
    "shower_track_length",
    "cascade_angular_pdf",
    "shower_photons",
    "isotropic_source",
    "laser_source",
    "scintillation_photons",
]

_LN10 = math.log(10.0)
_RANGE_FLOOR_MEV = 0.1  # lower limit of the CSDA integral (range below 0.1 MeV < 1e-5 m for muons)

# Raedel & Wiebusch 2012, Astropart. Phys. 38, 53: parameters for ice (density 0.9216 g/cm^3).
RW_ICE_DENSITY = 0.9216
RW_LONGITUDINAL = {  # a = alpha + beta log10(E/GeV), b
    "e-": (2.01849, 1.45469, 0.63207),
    "e+": (2.00035, 1.45501, 0.63008),
    "gamma": (2.83923, 1.34031, 0.64526),
}
RW_TRACK_LENGTH = {  # l = alpha E^beta [cm in ice, E in GeV]; sigma = alpha_dev E^beta_dev
    "e-": (532.07078881, 1.00000211, 5.78170887, 0.5),
    "e+": (532.11320598, 0.99999254, 5.73419669, 0.5),
    "gamma": (532.08540905, 0.99999877, 5.66586567, 0.5),
}
RW_ANGULAR_EM = (4.27033, -6.02527, 0.29887, -0.00103)  # a, b, c, d for electromagnetic cascades


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _check_particle(particle: Any, allowed: tuple[str, ...]) -> str:
    return check_choice(particle, "particle", allowed)


def _as_energy(energy: Any, n_events: int | None, device: torch.device) -> Tensor:
    """Kinetic energies [MeV] as a float64 (E,) tensor; rejects non-finite, zero or negative values."""
    e = torch.as_tensor(energy, dtype=torch.float64).clone()  # never alias (and mutate) the caller's tensor
    if e.dim() > 1:
        raise ConfigError(f"energy: got shape {tuple(e.shape)}, expected a scalar or (E,)")
    if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
        bad = e[~torch.isfinite(e) | (e <= 0)].flatten()[:3].tolist()
        raise ConfigError(f"energy: got {bad} MeV, allowed: finite kinetic energies > 0 MeV")
    e = e.to(device)
    if n_events is not None:
        e = e.expand(n_events).clone() if e.dim() == 0 else e
        if e.numel() != n_events:
            raise ConfigError(f"energy: got {e.numel()} values for {n_events} events")
    return e.reshape(-1)


def _as_points(x: Any, field: str) -> Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != 3:
        raise ConfigError(f"{field}: got shape {tuple(t.shape)}, expected (3,) or (E, 3)")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{field}: contains non-finite values")
    return t


def _as_directions(d: Any, field: str = "direction") -> Tensor:
    t = _as_points(d, field)
    norm = t.norm(dim=1, keepdim=True)
    if bool((norm <= 0).any()):
        raise ConfigError(f"{field}: got a zero vector, expected non-zero directions")
    return t / norm


def _orthonormal_basis(d: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors (N,3) orthogonal to the unit vectors d (N,3) and to each other."""
    helper = torch.zeros_like(d)
    use_x = d[:, 0].abs() < 0.9
    helper[use_x, 0] = 1.0
    helper[~use_x, 1] = 1.0
    e1 = torch.linalg.cross(helper, d)
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(d, e1)
    return e1, e2


def _rotate(axis: Tensor, cos_t: Tensor, phi: Tensor) -> Tensor:
    """Unit vectors at polar angle acos(cos_t) and azimuth phi around unit ``axis`` (all (N,...))."""
    e1, e2 = _orthonormal_basis(axis)
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0))
    out = (
        cos_t.unsqueeze(1) * axis
        + (sin_t * torch.cos(phi)).unsqueeze(1) * e1
        + (sin_t * torch.sin(phi)).unsqueeze(1) * e2
    )
    return out / out.norm(dim=1, keepdim=True)


def _time_linear_beta(s: Tensor, b0: Tensor, b: Tensor) -> Tensor:
    """Flight time [ns] over path s [m] with beta linear in path from b0 to b: s ln(b/b0) / ((b - b0) c)."""
    db = b - b0
    small = db.abs() < 1e-7 * b0
    ratio = torch.where(
        small, 1.0 / b0 - 0.5 * db / (b0 * b0), torch.log(b / b0) / torch.where(small, 1.0, db)
    )
    return s * ratio / C_M_PER_NS


def _isotropic(n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    u = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64)
    cz = 2.0 * u[0] - 1.0
    phi = 2.0 * math.pi * u[1]
    sz = torch.sqrt((1.0 - cz * cz).clamp_min(0.0))
    return torch.stack([sz * torch.cos(phi), sz * torch.sin(phi), cz], 1).to(dtype)


def _poisson(mean: Tensor, generator: torch.Generator | None) -> Tensor:
    """Poisson draws (long) for non-negative float means (any device)."""
    return torch.poisson(mean.clamp_min(0.0).to(torch.float64), generator=generator).to(torch.long)


def _gamma_sample(shape_a: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gamma(a, 1) samples for a >= 1 (Marsaglia & Tsang, ACM TOMS 26 (2000) 363), vectorised rejection."""
    a = shape_a.to(torch.float64)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel(), device=a.device)
    for _ in range(200):
        if todo.numel() == 0:
            break
        dd, cc = d[todo], c[todo]
        x = torch.randn(todo.numel(), generator=generator, device=a.device, dtype=torch.float64)
        v = (1.0 + cc * x) ** 3
        u = torch.rand(todo.numel(), generator=generator, device=a.device, dtype=torch.float64)
        ok = (v > 0) & (
            torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + dd - dd * v + dd * torch.log(v.clamp_min(1e-300))
        )
        out[todo[ok]] = (dd * v)[ok]
        todo = todo[~ok]
    if todo.numel():  # practically unreachable (acceptance > 95 % per round)
        out[todo] = d[todo]
    return out


# ----------------------------------------------------------------------------------------------------------
# energy loss
# ----------------------------------------------------------------------------------------------------------
def density_effect(bg: Tensor, medium: Medium) -> Tensor:
    """Sternheimer density-effect correction delta(beta gamma) (PDG eq. 34.7, the medium's coefficients)."""
    st = medium.sternheimer
    x = torch.log10(bg.clamp_min(1e-12))
    lin = 2.0 * _LN10 * x - st["cbar"]
    mid = lin + st["a"] * (st["x1"] - x).clamp_min(0.0) ** st["k"]
    low = st["delta0"] * 10.0 ** (2.0 * (x - st["x0"]))
    return torch.where(x >= st["x1"], lin, torch.where(x >= st["x0"], mid, low))


def bethe_dedx(
    kinetic: Tensor, mass: float, medium: Medium, *, spin_half: bool = True, z: float = 1.0
) -> Tensor:
    """Mean electronic stopping power -dE/dx [MeV/m] at kinetic energy ``kinetic`` [MeV] (any shape).

    -dE/dx = K z^2 (Z/A) rho / beta^2 [ 1/2 ln(2 m_e c^2 beta^2 gamma^2 W_max / I^2) - beta^2 - delta/2
    (+ W_max^2 / (8 E^2) for spin 1/2) ],  W_max = 2 m_e beta^2 gamma^2 / (1 + 2 gamma m_e/M + (m_e/M)^2).
    """
    t = kinetic.to(torch.float64).clamp_min(1e-6)
    gamma = 1.0 + t / mass
    bg2 = t * (t + 2.0 * mass) / (mass * mass)
    beta2 = bg2 / (gamma * gamma)
    r = ELECTRON_MASS / mass
    wmax = 2.0 * ELECTRON_MASS * bg2 / (1.0 + 2.0 * gamma * r + r * r)
    i_mev = medium.mean_excitation_ev * 1e-6
    bracket = 0.5 * torch.log(2.0 * ELECTRON_MASS * bg2 * wmax / (i_mev * i_mev)) - beta2
    bracket = bracket - 0.5 * density_effect(torch.sqrt(bg2), medium)
    if spin_half:
        e_tot = gamma * mass
        bracket = bracket + 0.125 * (wmax / e_tot) ** 2
    dedx_cm = K_BETHE * z * z * medium.z_over_a * medium.density / beta2 * bracket  # MeV/cm
    return (
        (100.0 * dedx_cm).clamp_min(1e-3).to(kinetic.dtype if kinetic.is_floating_point() else torch.float64)
    )


def csda_range(particle: str, energy: Any, medium: Medium, *, n_grid: int = 513) -> Tensor:
    """CSDA range [m] = int_{0.1 MeV}^{T} dT / S(T) (log-grid trapezoid), for kinetic energies T [MeV]."""
    _check_particle(particle, TRACK_PARTICLES)
    mass = PARTICLE_MASS[particle]
    t = torch.as_tensor(energy, dtype=torch.float64).reshape(-1)
    out = torch.zeros_like(t)
    ok = t > _RANGE_FLOOR_MEV
    if bool(ok.any()):
        tt = t[ok]
        u = torch.linspace(0.0, 1.0, n_grid, dtype=torch.float64, device=t.device)
        lr = torch.log(tt / _RANGE_FLOOR_MEV)
        grid = _RANGE_FLOOR_MEV * torch.exp(u[None, :] * lr[:, None])  # (M, G)
        f = grid * lr[:, None] / bethe_dedx(grid, mass, medium, spin_half=particle.startswith("mu"))
        out[ok] = torch.trapezoid(f, u, dim=1)
    return out


def range_energy(particle: str, path: Any, medium: Medium, *, t_max: float = 1e5) -> Tensor:
    """Inverse of :func:`csda_range`: the kinetic energy T [MeV] whose CSDA range is ``path`` [m] (any shape,
    float64), by linear interpolation of ln T in the cumulative range table of ``_range_table`` (0.1 MeV to
    ``t_max``; 4097 points, relative error ~1e-5). Ranges beyond the table give t_max; 0 gives 0.1 MeV."""
    _check_particle(particle, TRACK_PARTICLES)
    r = torch.as_tensor(path, dtype=torch.float64)
    t, rng = _range_table(particle, medium, t_max, r.device)
    return torch.exp(_interp(r, rng, t.log()))


# ----------------------------------------------------------------------------------------------------------
# Frank-Tamm
# ----------------------------------------------------------------------------------------------------------
def _nu_grid(medium: Medium, n_grid: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Uniform grid in nu = 1/lambda [1/nm] over the band (odd size, for Simpson) and 1/n^2 on it."""
    n_grid += 1 - n_grid % 2
    nu = torch.linspace(1.0 / medium.wl_max, 1.0 / medium.wl_min, n_grid, dtype=torch.float64, device=device)
    n = medium.refractive_index(1.0 / nu)
    return nu, 1.0 / (n * n)


def _simpson_weights(nu: Tensor) -> Tensor:
    h = (nu[-1] - nu[0]) / (nu.numel() - 1)
    w = torch.ones_like(nu)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    return w * h / 3.0


def cherenkov_threshold_beta(medium: Medium) -> float:
    """Lowest speed that radiates in the band: 1 / max n(lambda)."""
    return 1.0 / medium.n_max


def frank_tamm_yield(beta: Tensor, medium: Medium, *, z: float = 1.0, n_grid: int = 2049) -> Tensor:
    """Mean Cherenkov photons per metre in [wl_min, wl_max] for speed beta (any shape), float64.

    dN/dx = 2 pi alpha z^2 int (1 - 1/(beta^2 n(lambda)^2))_+ dlambda / lambda^2 (Simpson in 1/lambda).
    """
    b = torch.as_tensor(beta, dtype=torch.float64)
    nu, inv_n2 = _nu_grid(medium, n_grid, b.device)
    w = _simpson_weights(nu)
    i0, i1 = w.sum(), (w * inv_n2).sum()
    x = 1.0 / (b * b).clamp_min(1e-12)
    res = i0 - x * i1  # valid where beta n_min >= 1 (no clipping)
    clip = (b * medium.n_min < 1.0).reshape(-1)
    flat = res.reshape(-1).clone()
    if bool(clip.any()):
        idx = torch.nonzero(clip).squeeze(1)
        xf = x.reshape(-1)
        for s in range(0, idx.numel(), 4096):
            j = idx[s : s + 4096]
            flat[j] = ((1.0 - xf[j, None] * inv_n2[None, :]).clamp_min(0.0) * w).sum(1)
    return 2.0 * math.pi * ALPHA * z * z * 1e9 * flat.reshape(res.shape).clamp_min(0.0)


def sample_cherenkov_wavelength(
    beta: Tensor, medium: Medium, generator: torch.Generator | None, *, max_rounds: int = 64
) -> Tensor:
    """Wavelengths [nm] (N,) from the Frank-Tamm spectrum (1 - 1/(beta^2 n^2))_+ / lambda^2 at each beta (N,).

    Proposal 1/lambda uniform (density 1/lambda^2), acceptance (1 - x/n^2)/(1 - x/n_max^2), x = 1/beta^2:
    exact. Photons still rejected after ``max_rounds`` (only within ~1e-4 of threshold in beta) get the
    wavelength of maximum n, where the spectrum is concentrated at threshold.
    """
    return _sample_cherenkov_wavelength_n(beta, medium, generator, max_rounds=max_rounds)[0]


def _sample_cherenkov_wavelength_n(
    beta: Tensor, medium: Medium, generator: torch.Generator | None, *, max_rounds: int = 64
) -> tuple[Tensor, Tensor]:
    """:func:`sample_cherenkov_wavelength` that also returns n(lambda) (N,) of the drawn wavelengths
    (float64; the same values as ``medium.refractive_index(wl)``, evaluated once per proposal)."""
    b = beta.to(torch.float64)
    dev = b.device
    x = 1.0 / (b * b)
    bound = (1.0 - x / medium.n_max**2).clamp_min(1e-300)
    nu_lo, nu_hi = 1.0 / medium.wl_max, 1.0 / medium.wl_min
    out = torch.empty_like(b)
    n_out = torch.empty_like(b)
    todo = None  # None: all photons (first round, no gathers needed)
    for _ in range(max_rounds):
        m = b.numel() if todo is None else todo.numel()
        if m == 0:
            break
        u = torch.rand(2, m, generator=generator, device=dev, dtype=torch.float64)
        wl = 1.0 / (nu_lo + (nu_hi - nu_lo) * u[0])
        n = medium.refractive_index(wl)
        if todo is None:
            acc = (1.0 - x / (n * n)) / bound
        else:
            acc = (1.0 - x[todo] / (n * n)) / bound[todo]
        ok = u[1] < acc
        if todo is None:
            out = torch.where(ok, wl, out)
            n_out = torch.where(ok, n, n_out)
            todo = torch.nonzero(~ok).squeeze(1)
        else:
            out[todo[ok]] = wl[ok]
            n_out[todo[ok]] = n[ok]
            todo = todo[~ok]
    if todo is not None and todo.numel():
        nu, inv_n2 = _nu_grid(medium, 513, dev)
        out[todo] = 1.0 / nu[torch.argmin(inv_n2)]
        n_out[todo] = medium.refractive_index(out[todo])
    return out, n_out


# ----------------------------------------------------------------------------------------------------------
# charged tracks
# ----------------------------------------------------------------------------------------------------------
def _range_table(
    particle: str, medium: Medium, t_max: float, device: torch.device, n_grid: int = 4097
) -> tuple[Tensor, Tensor]:
    """Kinetic-energy grid T (G,) [MeV], log-spaced from 0.1 MeV to ``t_max``, and the CSDA range R(T) (G,)
    [m] = int_{0.1 MeV}^{T} dT'/S(T') (cumulative trapezoid in ln T; relative error ~1e-5)."""
    mass = PARTICLE_MASS[particle]
    lt = torch.linspace(
        math.log(_RANGE_FLOOR_MEV),
        math.log(max(t_max, 2 * _RANGE_FLOOR_MEV)),
        n_grid,
        dtype=torch.float64,
        device=device,
    )
    t = torch.exp(lt)
    f = t / bethe_dedx(t, mass, medium, spin_half=particle.startswith("mu"))
    dr = 0.5 * (f[1:] + f[:-1]) * (lt[1:] - lt[:-1])
    return t, torch.cat([dr.new_zeros(1), torch.cumsum(dr, 0)])


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp ascending, fp) at x (any shape); clamps outside the table."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[i - 1], xp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def _event_vertices_directions(vertex: Any, direction: Any, field: str = "vertex") -> tuple[Tensor, Tensor]:
    """Per-event start points (E,3) and unit directions (E,3), float64, from (E,3) or (3,) inputs (one row is
    broadcast to the other's E rows); unequal row counts raise ConfigError naming ``field``/direction."""
    pos = _as_points(vertex, field).to(torch.float64)
    dirs = _as_directions(direction).to(device=pos.device, dtype=torch.float64)
    n_ev = max(pos.shape[0], dirs.shape[0])
    pos = pos.expand(n_ev, 3) if pos.shape[0] == 1 else pos
    dirs = dirs.expand(n_ev, 3) if dirs.shape[0] == 1 else dirs
    if pos.shape[0] != dirs.shape[0]:
        raise ConfigError(f"{field}/direction: got {pos.shape[0]} and {dirs.shape[0]} rows, expected equal")
    return pos, dirs


def track_steps(
    particle: str,
    energy: Any,
    vertex: Any,
    direction: Any,
    medium: Medium,
    generator: torch.Generator | None,
    *,
    t0: Any = 0.0,
    max_step: float = 0.02,
    max_beta_change: float = 0.10,
    multiple_scattering: bool = True,
    stop: str = "cherenkov",
    min_energy: float = 1.0,
    max_length: float | None = None,
    dtype: torch.dtype = torch.float32,
    return_track_length: bool = False,
) -> TrackSteps | tuple[TrackSteps, Tensor]:
    """Continuous-slowing-down transport of muons / charged pions; straight steps for Cherenkov emission.

    Loop-free over events and steps. The kinetic energy along the path follows the CSDA range table,
    T(s) = R^-1(R(T_0) - s). Steps are ``max_step`` long while that changes beta by less than
    ``max_beta_change``; after that (beta falls ever faster towards the stop) each step lowers beta by exactly
    that fraction. This is the greedy min(max_step, beta-change) rule of Geant4's G4Cerenkov step limit.
    Multiple scattering (Highland, see module docstring) deflects the direction after each step; the
    deflections accumulate in the tangent plane of the initial direction, exact to O(theta_tot^2) for the
    total deflection theta_tot (a few degrees for tracks above the Cherenkov threshold).

    Args:
        particle: 'mu-', 'mu+', 'pi-', 'pi+'.
        energy: kinetic energy [MeV], scalar or (E,).
        vertex: (E,3) or (3,) start point [m]; direction: (E,3) or (3,) (normalised here).
        medium: a :class:`Medium` (stopping data, n(lambda), radiation length).
        t0: start time [ns], scalar or (E,).
        max_step: maximum step length [m]; max_beta_change: maximum fractional beta change per step.
        stop: 'cherenkov' (stop at the Cherenkov threshold of the medium) or 'rest' (go down to min_energy).
        max_length: optional cap on the path length per event [m] (e.g. the distance to the detector wall).
        return_track_length: also return the true path length per event [m] (E,), including the CSDA range
            left below the stopping energy.

    Returns: TrackSteps (beta0/beta1 at the step ends; n_photons = mean Frank-Tamm number with the
    step-average beta; 0 below threshold), rows grouped by event; optionally (steps, track_length).
    A particle that starts below threshold (stop='cherenkov') gives no steps.
    """
    particle = _check_particle(particle, TRACK_PARTICLES)
    stop = check_choice(stop, "stop", ("cherenkov", "rest"))
    max_step = check_number(max_step, "max_step", minimum=0.0, strict_min=True)
    max_beta_change = check_number(
        max_beta_change, "max_beta_change", minimum=0.0, strict_min=True, maximum=0.9
    )
    min_energy = check_number(min_energy, "min_energy", minimum=_RANGE_FLOOR_MEV)
    cap = (
        math.inf
        if max_length is None
        else check_number(max_length, "max_length", minimum=0.0, strict_min=True)
    )
    pos, dirs = _event_vertices_directions(vertex, direction)
    n_ev, dev = pos.shape[0], pos.device
    t_kin = _as_energy(energy, n_ev, dev)
    time0 = torch.as_tensor(t0, dtype=torch.float64, device=dev).expand(n_ev)
    mass = PARTICLE_MASS[particle]
    if stop == "cherenkov":
        b_th = cherenkov_threshold_beta(medium)
        t_stop = mass * (1.0 / math.sqrt(1.0 - b_th * b_th) - 1.0)
    else:
        t_stop = min_energy
    t_stop = max(t_stop, min_energy)

    def kin_to_beta(t: Tensor) -> Tensor:
        return torch.sqrt(t * (t + 2 * mass)) / (t + mass)

    # range table and per-event path length to the stopping energy (or the cap)
    t_grid, r_grid = _range_table(particle, medium, float(t_kin.max()) * 1.0001, dev)
    r0 = _interp(t_kin, t_grid, r_grid)  # (E,)
    r_stop = float(_interp(torch.tensor([t_stop], dtype=torch.float64, device=dev), t_grid, r_grid))
    path = (r0 - r_stop).clamp_min(0.0)
    capped = path > cap
    path = torch.clamp(path, max=cap)
    below = t_kin <= t_stop
    residual = torch.where(capped | below, torch.zeros_like(r0), torch.full_like(r0, r_stop))
    track_length = path + residual
    if bool(below.any()):  # the whole CSDA range, from the same integral as csda_range()
        track_length[below] = csda_range(particle, t_kin[below], medium)

    # Step boundaries, Geant4-like greedy limits: steps of max_step while that changes beta by less than
    # max_beta_change, then (where beta falls faster, monotonically towards the stop) steps that each
    # reduce beta by exactly that fraction: beta_j = beta_* (1 - max_beta_change)^j.
    def t_at(s: Tensor) -> Tensor:  # kinetic energy after path s (E, K) [MeV]
        return _interp(r0[:, None] - s, r_grid, t_grid).clamp_min(t_stop)

    n_uni = int(math.ceil(float(path.max()) / max_step)) if n_ev else 0
    if n_uni == 0:
        steps = _empty_steps(dev, dtype)
        return (steps, track_length) if return_track_length else steps
    s_u = torch.arange(n_uni + 1, device=dev, dtype=torch.float64)[None, :] * max_step
    s_u = torch.minimum(s_u, path[:, None])  # (E, U+1)
    beta_u = kin_to_beta(t_at(s_u))
    beta_next = kin_to_beta(t_at(torch.minimum(s_u + max_step, path[:, None])))
    bind = (beta_next < (1.0 - max_beta_change) * beta_u) & (s_u < path[:, None])
    first = torch.where(bind.any(1), bind.float().argmax(1), torch.full_like(path, n_uni, dtype=torch.long))
    s_star = s_u.gather(1, first[:, None])  # (E, 1) start of the beta-limited region
    beta_star = beta_u.gather(1, first[:, None])
    b_stop = kin_to_beta(torch.tensor(t_stop, dtype=torch.float64, device=dev))
    n_geo = (
        int(
            math.ceil(
                math.log(float(b_stop) / float(beta_star.max().clamp_min(b_stop + 1e-12)))
                / math.log(1.0 - max_beta_change)
            )
        )
        + 1
        if bool(bind.any())
        else 0
    )
    n_geo = max(n_geo, 0)
    j = torch.arange(1, n_geo + 1, device=dev, dtype=torch.float64)[None, :]
    beta_geo = (beta_star * (1.0 - max_beta_change) ** j).clamp_min(float(b_stop))
    t_geo = mass * (1.0 / torch.sqrt(1.0 - beta_geo * beta_geo) - 1.0)
    s_geo = r0[:, None] - _interp(t_geo, t_grid, r_grid)
    s_geo = torch.where(bind.any(1, keepdim=True), s_geo.clamp_min(s_star), path[:, None].expand_as(s_geo))
    idx = torch.arange(n_uni + 1, device=dev)[None, :]
    s_u = torch.where(idx <= first[:, None], s_u, path[:, None])
    s_b = torch.cat([s_u, s_geo, path[:, None]], 1)
    s_b = torch.minimum(s_b, path[:, None]).sort(dim=1).values
    k_max = s_b.shape[1] - 1
    t_b = t_at(s_b)  # kinetic energy at boundaries
    t_b[:, 0] = t_kin
    beta_b = kin_to_beta(t_b)
    ds = s_b[:, 1:] - s_b[:, :-1]  # (E, K)
    b0, b1 = beta_b[:, :-1], beta_b[:, 1:]

    # multiple scattering: Highland theta0^2 increments along the accumulated path, applied after each step
    step_dirs = dirs[:, None, :].expand(n_ev, k_max, 3)
    if multiple_scattering:
        tm = 0.5 * (t_b[:, :-1] + t_b[:, 1:])
        bm = kin_to_beta(tm)
        pm = torch.sqrt(tm * (tm + 2 * mass))

        def highland_var(xx: Tensor) -> Tensor:
            r = (xx / medium.radiation_length).clamp_min(1e-12)
            return r * (1.0 + 0.038 * torch.log(r / (bm * bm))).clamp_min(0.0) ** 2

        var = (13.6 / (bm * pm)) ** 2 * (highland_var(s_b[:, 1:]) - highland_var(s_b[:, :-1])).clamp_min(0.0)
        g = torch.randn(2, n_ev, k_max, generator=generator, device=dev, dtype=torch.float64)
        th = torch.sqrt(var)
        # deflection after step k changes the direction of steps k+1, k+2, ...
        c1 = torch.cumsum(th * g[0], 1) - th * g[0]
        c2 = torch.cumsum(th * g[1], 1) - th * g[1]
        e1, e2 = _orthonormal_basis(dirs)
        nd = dirs[:, None, :] + c1[..., None] * e1[:, None, :] + c2[..., None] * e2[:, None, :]
        step_dirs = nd / nd.norm(dim=2, keepdim=True)
    x_b = torch.cat([pos[:, None, :], pos[:, None, :] + torch.cumsum(ds[..., None] * step_dirs, 1)], 1)
    dt = _time_linear_beta(ds, b0, b1)
    tm_b = torch.cat([time0[:, None], time0[:, None] + torch.cumsum(dt, 1)], 1)
    nph = ds * frank_tamm_yield(0.5 * (b0 + b1), medium)
    keep = ds > 0  # (E, K), row-major flattening keeps rows grouped by event
    ev = torch.arange(n_ev, device=dev)[:, None].expand(n_ev, k_max)
    steps = TrackSteps(
        x0=x_b[:, :-1][keep].to(dtype),
        x1=x_b[:, 1:][keep].to(dtype),
        beta0=b0[keep].to(dtype),
        beta1=b1[keep].to(dtype),
        t0=tm_b[:, :-1][keep].to(dtype),
        n_photons=nph[keep].to(dtype),
        event=ev[keep],
    )
    return (steps, track_length) if return_track_length else steps


def _empty_steps(device: torch.device, dtype: torch.dtype) -> TrackSteps:
    z = torch.zeros(0, dtype=dtype, device=device)
    return TrackSteps(
        x0=z.reshape(0, 3),
        x1=z.reshape(0, 3),
        beta0=z,
        beta1=z,
        t0=z,
        n_photons=z,
        event=torch.zeros(0, dtype=torch.long, device=device),
    )


def cherenkov_polarization(direction: Tensor, axis: Tensor) -> Tensor:
    """Linear polarisation (N,3) of Cherenkov photons with unit directions k (N,3) radiated by a particle
    moving along unit u = ``axis`` (N,3): e = ((u.k) k - u) / |(u.k) k - u|, perpendicular to k in the plane
    of k and u (the field of the Cherenkov cone is radial about the track: Jelley, *Cerenkov Radiation*,
    1958, ch. 2; Geant4's G4Cerenkov sets the same vector). Rows with k parallel to u (no such plane) are
    zero: the optics then draws a random polarisation for them."""
    uk = (direction * axis).sum(-1, keepdim=True)
    e = uk * direction - axis
    norm = e.norm(dim=-1, keepdim=True)
    return torch.where(norm > 1e-9, e / norm.clamp_min(1e-30), torch.zeros_like(e))


def iter_cherenkov_photons(
    steps: TrackSteps,
    medium: Medium,
    generator: torch.Generator | None,
    thin: float = 1.0,
    *,
    chunk_photons: int = 2_000_000,
    dtype: torch.dtype = torch.float32,
    with_polarization: bool = False,
) -> Iterator[Photons] | Iterator[tuple[Photons, Tensor]]:
    """Cherenkov photons from track steps, yielded in chunks of about ``chunk_photons`` photons.

    Per step: N ~ Poisson(thin * n_photons); emission point uniform on the segment with beta linearly
    interpolated; wavelength from the Frank-Tamm spectrum at that beta; direction on the cone
    cos theta = 1/(beta n(lambda)) around the segment with uniform azimuth; time t0 + int ds / (beta c)
    with beta linear along the step (exact log form). ``with_polarization``: yield (photons, polarisation
    (N,3)) with the polarisation of :func:`cherenkov_polarization` about each photon's own step direction
    (no extra random numbers: the photons are the same).

    Precision: beta, wavelength, n and time are always float64; position and direction are evaluated in
    float64 for ``dtype=torch.float64`` and in float32 otherwise (the output precision). The random stream
    does not depend on ``dtype``.
    """
    thin = check_number(thin, "thin", minimum=0.0, maximum=1.0)
    if len(steps) == 0:
        return
    dev = steps.x0.device
    counts = _poisson(steps.n_photons.to(torch.float64) * thin, generator)
    csum = torch.cumsum(counts, 0)
    total = int(csum[-1]) if counts.numel() else 0
    if total == 0:
        return
    # split the steps into chunks with ~chunk_photons photons each
    if total > chunk_photons:
        marks = torch.arange(chunk_photons, total, chunk_photons, device=dev, dtype=csum.dtype)
        inner = [int(b) for b in torch.searchsorted(csum, marks, right=True).tolist()]
    else:
        inner = []
    edges = [0] + inner + [len(steps)]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b <= a:
            continue
        cnt = counts[a:b]
        ns = int(cnt.sum())
        if ns == 0:
            continue
        # per-step quantities (float64), computed once per step and repeated per photon in one go. Beta,
        # wavelength and time stay float64 (exact Frank-Tamm sampling; log form of the flight time); the
        # geometry (position, cone rotation) is evaluated in float32 when the output is float32 or lower.
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        x0s = steps.x0[a:b].to(torch.float64)
        segs = steps.x1[a:b].to(torch.float64) - x0s
        lens = segs.norm(dim=1).clamp_min(1e-15)
        axes = segs / lens.unsqueeze(1)
        e1s, e2s = _orthonormal_basis(axes)
        geo = torch.repeat_interleave(torch.cat([x0s, segs, axes, e1s, e2s], 1).to(cd), cnt, dim=0)
        cols = [
            steps.beta0[a:b].to(torch.float64),
            steps.beta1[a:b].to(torch.float64),
            steps.t0[a:b].to(torch.float64),
            lens,
        ]
        sc = torch.repeat_interleave(torch.stack(cols, 1), cnt, dim=0)  # (ns, 4)
        x0, seg, axis, e1, e2 = geo[:, 0:3], geo[:, 3:6], geo[:, 6:9], geo[:, 9:12], geo[:, 12:15]
        b0, b1, t0, seg_len = sc[:, 0], sc[:, 1], sc[:, 2], sc[:, 3]
        u = torch.rand(ns, generator=generator, device=dev, dtype=torch.float64)
        beta = b0 + u * (b1 - b0)
        wl, n = _sample_cherenkov_wavelength_n(beta, medium, generator)
        cos_t = (1.0 / (beta * n)).clamp(-1.0, 1.0).to(cd)
        phi = (2.0 * math.pi * torch.rand(ns, generator=generator, device=dev, dtype=torch.float64)).to(cd)
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0))
        d = cos_t.unsqueeze(1) * axis + (sin_t * torch.cos(phi)).unsqueeze(1) * e1
        d += (sin_t * torch.sin(phi)).unsqueeze(1) * e2
        d /= d.norm(dim=1, keepdim=True)
        pos = x0 + u.to(cd).unsqueeze(1) * seg
        t = t0 + _time_linear_beta(u * seg_len, b0, beta)
        photons = Photons(
            pos=pos.to(dtype),
            dir=d.to(dtype),
            t=t.to(dtype),
            wavelength=wl.to(dtype),
            event=torch.repeat_interleave(steps.event[a:b], cnt),
        )
        yield (photons, cherenkov_polarization(d, axis).to(dtype)) if with_polarization else photons


def _empty_photons(device: torch.device, dtype: torch.dtype) -> Photons:
    z = torch.zeros(0, dtype=dtype, device=device)
    return Photons(
        pos=z.reshape(0, 3),
        dir=z.reshape(0, 3),
        t=z,
        wavelength=z,
        event=torch.zeros(0, dtype=torch.long, device=device),
    )


def cherenkov_photons(
    steps: TrackSteps,
    medium: Medium,
    generator: torch.Generator | None,
    thin: float = 1.0,
    *,
    chunk_photons: int = 2_000_000,
    dtype: torch.dtype = torch.float32,
    with_polarization: bool = False,
) -> Photons | tuple[Photons, Tensor]:
    """All Cherenkov photons of ``steps`` (see :func:`iter_cherenkov_photons`), as one Photons record (and,
    ``with_polarization``, their (N,3) polarisation)."""
    parts = list(
        iter_cherenkov_photons(
            steps, medium, generator, thin, chunk_photons=chunk_photons, dtype=dtype, with_polarization=True
        )
    )
    dev = steps.x0.device
    photons = Photons.cat([p for p, _ in parts]) if parts else _empty_photons(dev, dtype)
    if not with_polarization:
        return photons
    pol = torch.cat([e for _, e in parts]) if parts else torch.zeros(0, 3, dtype=dtype, device=dev)
    return photons, pol


# ----------------------------------------------------------------------------------------------------------
# EM showers
# ----------------------------------------------------------------------------------------------------------
def shower_params(particle: str, energy: Tensor) -> tuple[Tensor, Tensor]:
    """Gamma-profile shape a and rate b (per radiation length) of a cascade (Raedel & Wiebusch 2012).

    a = alpha + beta log10(E/GeV), floored at 1 (below ~0.5 GeV the fit would give a < 1; the profile then
    becomes a pure exponential starting at the vertex). Gammas use the electron profile after conversion.
    """
    key = "e-" if particle == "gamma" else particle
    alpha, beta, b = RW_LONGITUDINAL[key]
    e_gev = energy.to(torch.float64) * 1e-3
    a = (alpha + beta * torch.log10(e_gev.clamp_min(1e-6))).clamp_min(1.0)
    return a, torch.full_like(a, b)


def shower_track_length(particle: str, energy: Tensor, medium: Medium) -> tuple[Tensor, Tensor]:
    """Mean and std of the cascade's Cherenkov track length [m] in ``medium`` (R&W l = alpha E^beta in ice,
    scaled by density: l_medium = l_ice * rho_ice / rho_medium)."""
    alpha, beta, a_dev, b_dev = RW_TRACK_LENGTH[particle]
    e_gev = energy.to(torch.float64) * 1e-3
    scale = 0.01 * RW_ICE_DENSITY / medium.density  # cm in ice -> m in the medium
    return scale * alpha * e_gev**beta, scale * a_dev * e_gev**b_dev


def cascade_angular_pdf(
    cos_t: Tensor, n: float, params: tuple[float, float, float, float] = RW_ANGULAR_EM
) -> Tensor:
    """Unnormalised angular distribution of cascade Cherenkov photons, a exp(b |cos - 1/n|^c) + d (R&W)."""
    a, b, c, d = params
    return (a * torch.exp(b * (cos_t - 1.0 / n).abs() ** c) + d).clamp_min(0.0)


def _effective_index(medium: Medium) -> float:
    """Frank-Tamm (beta = 1) weighted mean of n over the band (the cascade profile is centred on 1/n)."""
    nu, inv_n2 = _nu_grid(medium, 1025, torch.device("cpu"))
    w = _simpson_weights(nu) * (1.0 - inv_n2)
    return float((w * torch.rsqrt(inv_n2)).sum() / w.sum())


def shower_photons(
    particle: str,
    energy: Any,
    vertex: Any,
    direction: Any,
    medium: Medium,
    generator: torch.Generator | None,
    thin: float = 1.0,
    *,
    t0: Any = 0.0,
    fluctuate: bool = True,
    dtype: torch.dtype = torch.float32,
    n_cos_grid: int = 8001,
    with_polarization: bool = False,
) -> Photons | tuple[Photons, Tensor]:
    """Cherenkov photons of electromagnetic cascades (e-, e+, gamma) as parametrised by Raedel & Wiebusch.

    Per event: photon number N ~ Poisson(thin * l * dN/dx(beta=1)) with l the cascade track length (Gaussian
    fluctuation of width sigma_l when ``fluctuate``); depth along the axis x = X0 t, t ~ Gamma(a, b)
    (plus an exponential conversion depth of mean 9/7 X0 for gammas); direction at cos theta from the cascade
    angular distribution around the axis, uniform azimuth; wavelength from the beta = 1 Frank-Tamm spectrum;
    time t0 + depth / c. Lateral spread of the cascade is neglected. Inputs as in :func:`track_steps`.
    ``with_polarization``: also return the (N,3) polarisation of :func:`cherenkov_polarization` about the
    cascade axis (the radiating particles' own directions are not modelled: an approximation for photons far
    off the Cherenkov angle).
    """
    particle = _check_particle(particle, SHOWER_PARTICLES)
    thin = check_number(thin, "thin", minimum=0.0, maximum=1.0)
    pos, dirs = _event_vertices_directions(vertex, direction)
    n_ev, dev = pos.shape[0], pos.device
    e = _as_energy(energy, n_ev, dev)
    time0 = torch.as_tensor(t0, dtype=torch.float64, device=dev).expand(n_ev)
    x0_rad = medium.radiation_length
    l_mean, l_sig = shower_track_length(particle, e, medium)
    if fluctuate:
        l_mean = (
            l_mean + l_sig * torch.randn(n_ev, generator=generator, device=dev, dtype=torch.float64)
        ).clamp_min(0.0)
    y1 = float(frank_tamm_yield(torch.tensor(1.0, dtype=torch.float64), medium))
    counts = _poisson(thin * l_mean * y1, generator)
    ntot = int(counts.sum())
    if ntot == 0:
        empty = _empty_photons(dev, dtype)
        return (empty, torch.zeros(0, 3, dtype=dtype, device=dev)) if with_polarization else empty
    ev = torch.repeat_interleave(torch.arange(n_ev, device=dev), counts)
    a, b = shower_params(particle, e)
    depth = _gamma_sample(a[ev], generator) / b[ev] * x0_rad
    if particle == "gamma":
        conv = (
            -(9.0 / 7.0)
            * x0_rad
            * torch.log(
                torch.rand(n_ev, generator=generator, device=dev, dtype=torch.float64).clamp_min(1e-300)
            )
        )
        depth = depth + conv[ev]
    axis = dirs[ev]
    # angular distribution: inverse CDF on a fine grid of cos theta
    n_eff = _effective_index(medium)
    cgrid = torch.linspace(-1.0, 1.0, n_cos_grid, dtype=torch.float64, device=dev)
    pdf = cascade_angular_pdf(cgrid, n_eff)
    cos_t = sample_piecewise_linear(cgrid, pdf, ntot, generator, device=dev, dtype=torch.float64)
    phi = 2.0 * math.pi * torch.rand(ntot, generator=generator, device=dev, dtype=torch.float64)
    d = _rotate(axis, cos_t, phi)
    wl = sample_cherenkov_wavelength(torch.ones(ntot, dtype=torch.float64, device=dev), medium, generator)
    p = pos[ev] + depth.unsqueeze(1) * axis
    t = time0[ev] + depth / C_M_PER_NS
    photons = Photons(pos=p.to(dtype), dir=d.to(dtype), t=t.to(dtype), wavelength=wl.to(dtype), event=ev)
    return (photons, cherenkov_polarization(d, axis).to(dtype)) if with_polarization else photons


# ----------------------------------------------------------------------------------------------------------
# calibration sources
# ----------------------------------------------------------------------------------------------------------
def _sample_source_wavelength(
    spec: Any, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Wavelength spec: a number (fixed) [nm], (lo, hi) uniform band, or {'wavelength_nm': [...],
    'intensity': [...]} piecewise-linear table."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        w = check_number(spec, "wavelength", minimum=0.0, strict_min=True)
        return torch.full((n,), w, dtype=torch.float64, device=device)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        lo = check_number(spec[0], "wavelength[0]", minimum=0.0, strict_min=True)
        hi = check_number(spec[1], "wavelength[1]", minimum=lo)
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if isinstance(spec, dict) and set(spec) == {"wavelength_nm", "intensity"}:
        x = torch.as_tensor(spec["wavelength_nm"], dtype=torch.float64)
        y = torch.as_tensor(spec["intensity"], dtype=torch.float64)
        if (
            x.dim() != 1
            or x.shape != y.shape
            or x.numel() < 2
            or bool((x[1:] <= x[:-1]).any())
            or bool((y < 0).any())
            or float(y.sum()) <= 0
        ):
            raise ConfigError(
                "wavelength: table needs increasing wavelength_nm and non-negative intensity of "
                "equal length >= 2 with a positive sum"
            )
        return sample_piecewise_linear(x, y, n, generator, device=device, dtype=torch.float64)
    raise ConfigError(
        f"wavelength: got {spec!r}, allowed: a number [nm], (lo, hi) or "
        "{'wavelength_nm': [...], 'intensity': [...]}"
    )


def _source_counts(
    n_photons: Any, n_ev: int, poisson: bool, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    mean = check_number(n_photons, "n_photons", minimum=0.0)
    if poisson:
        return _poisson(torch.full((n_ev,), mean, dtype=torch.float64, device=device), generator)
    if float(mean) != int(mean):
        raise ConfigError(f"n_photons: got {n_photons!r}, expected an integer (or poisson=True for a mean)")
    return torch.full((n_ev,), int(mean), dtype=torch.long, device=device)


def _source_times(ev: Tensor, t0: Any, time_sigma: float, generator: torch.Generator | None) -> Tensor:
    sig = check_number(time_sigma, "time_sigma", minimum=0.0)
    n_ev = int(ev.max()) + 1 if ev.numel() else 0
    base = torch.as_tensor(t0, dtype=torch.float64, device=ev.device).expand(max(n_ev, 1))[ev]
    if sig > 0:
        base = base + sig * torch.randn(
            ev.numel(), generator=generator, device=ev.device, dtype=torch.float64
        )
    return base


def isotropic_source(
    position: Any,
    n_photons: Any,
    generator: torch.Generator | None,
    *,
    poisson: bool = False,
    wavelength: Any = 400.0,
    t0: Any = 0.0,
    time_sigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> Photons:
    """Isotropic point source: per event (row of ``position`` (E,3) [m]) ``n_photons`` photons (or Poisson
    with that mean), directions uniform on the sphere, wavelength spec (see _sample_source_wavelength), time
    t0 (delta) or Gaussian of width time_sigma [ns]."""
    pos = _as_points(position, "position").to(torch.float64)
    dev = pos.device
    counts = _source_counts(n_photons, pos.shape[0], poisson, generator, dev)
    ev = torch.repeat_interleave(torch.arange(pos.shape[0], device=dev), counts)
    n = ev.numel()
    d = _isotropic(n, generator, dev, torch.float64)
    wl = _sample_source_wavelength(wavelength, n, generator, dev)
    t = _source_times(ev, t0, time_sigma, generator)
    return Photons(pos=pos[ev].to(dtype), dir=d.to(dtype), t=t.to(dtype), wavelength=wl.to(dtype), event=ev)


def laser_source(
    position: Any,
    direction: Any,
    n_photons: Any,
    generator: torch.Generator | None,
    *,
    divergence: float = 0.0,
    profile: str = "uniform",
    poisson: bool = False,
    wavelength: Any = 405.0,
    t0: Any = 0.0,
    time_sigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> Photons:
    """Collimated laser / diffuser-less light injector.

    divergence [rad]: 'uniform' -> directions uniform in solid angle inside the cone of half-angle divergence
    (cos theta uniform in [cos div, 1]); 'gaussian' -> projected angles Gaussian with sigma = divergence.
    """
    profile = check_choice(profile, "profile", ("uniform", "gaussian"))
    div = check_number(divergence, "divergence", minimum=0.0, maximum=math.pi)
    pos, dirs = _event_vertices_directions(position, direction, "position")
    n_ev, dev = pos.shape[0], pos.device
    counts = _source_counts(n_photons, n_ev, poisson, generator, dev)
    ev = torch.repeat_interleave(torch.arange(n_ev, device=dev), counts)
    n = ev.numel()
    if profile == "uniform":
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        cos_t = 1.0 - u * (1.0 - math.cos(div))
        phi = 2.0 * math.pi * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        d = _rotate(dirs[ev], cos_t, phi)
    else:
        g = torch.randn(2, n, generator=generator, device=dev, dtype=torch.float64) * div
        e1, e2 = _orthonormal_basis(dirs[ev])
        d = dirs[ev] + g[0].unsqueeze(1) * e1 + g[1].unsqueeze(1) * e2
        d = d / d.norm(dim=1, keepdim=True)
    wl = _sample_source_wavelength(wavelength, n, generator, dev)
    t = _source_times(ev, t0, time_sigma, generator)
    return Photons(pos=pos[ev].to(dtype), dir=d.to(dtype), t=t.to(dtype), wavelength=wl.to(dtype), event=ev)


# ----------------------------------------------------------------------------------------------------------
# scintillation
# ----------------------------------------------------------------------------------------------------------
def scintillation_photons(
    steps: TrackSteps,
    medium: Medium,
    generator: torch.Generator | None,
    particle: str = "mu-",
    thin: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Photons:
    """Scintillation photons along track steps (make them with ``track_steps(..., stop='rest')``).

    Per step: deposit dE = S(beta_avg) L with S the Bethe-Bloch stopping power [MeV/m]; mean photons
    Y dE / (1 + kB S) (Birks), N ~ Poisson(thin * mean); emission point uniform on the segment; isotropic;
    time = t0 + s / (beta c) + delay from the rise/decay profile; wavelength from the emission spectrum.
    """
    if not isinstance(medium, Scintillator):
        raise ConfigError(
            f"medium: got {type(medium).__name__} {medium.name!r}, expected a Scintillator "
            "(a medium config with a 'scintillation' block)"
        )
    particle = _check_particle(particle, TRACK_PARTICLES)
    thin = check_number(thin, "thin", minimum=0.0, maximum=1.0)
    dev = steps.x0.device
    if len(steps) == 0:
        return _empty_photons(dev, dtype)
    mass = PARTICLE_MASS[particle]
    b0 = steps.beta0.to(torch.float64)
    b1 = steps.beta1.to(torch.float64)
    bm = (0.5 * (b0 + b1)).clamp(1e-6, 1.0 - 1e-12)
    kin = mass * (1.0 / torch.sqrt(1.0 - bm * bm) - 1.0)
    sp = bethe_dedx(kin, mass, medium, spin_half=particle.startswith("mu"))
    seg = steps.x1.to(torch.float64) - steps.x0.to(torch.float64)
    seg_len = seg.norm(dim=1)
    mean = medium.birks_yield(sp * seg_len, sp)
    counts = _poisson(thin * mean, generator)
    n = int(counts.sum())
    if n == 0:
        return _empty_photons(dev, dtype)
    idx = torch.repeat_interleave(torch.arange(len(steps), device=dev), counts)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    beta = b0[idx] + u * (b1[idx] - b0[idx])
    s = u * seg_len[idx]
    t = (
        steps.t0[idx].to(torch.float64)
        + _time_linear_beta(s, b0[idx], beta)
        + medium.sample_emission_time(n, generator, device=dev, dtype=torch.float64)
    )
    pos = steps.x0[idx].to(torch.float64) + u.unsqueeze(1) * seg[idx]
    d = _isotropic(n, generator, dev, torch.float64)
    wl = medium.sample_wavelength(n, generator, device=dev, dtype=torch.float64)
    return Photons(
        pos=pos.to(dtype), dir=d.to(dtype), t=t.to(dtype), wavelength=wl.to(dtype), event=steps.event[idx]
    )
