"""Expected indirect light: scattered and reflected photons, by expected-value photon tracing.

The direct light (no scattering, no reflection) is :mod:`physics.expected`'s exact quadrature. This module
gives the rest: the expected p.e. per PMT from photons that were scattered (Rayleigh, Mie) or reflected (wall,
PMT glass) at least once, with the same physics as the Monte Carlo (:mod:`physics.optics`), by tracing a
sample of photons with FIXED random numbers (a ``torch.Generator`` seed) and scoring every PMT at every
interaction by next-event estimation (point detectors; Lux & Koblinger, *Monte Carlo Particle Transport
Methods*, CRC 1991, ch. 7; Kalos & Whitlock, *Monte Carlo Methods*, 2nd ed., sec. 6). Per traced ray and
round, with w its weight (photons it stands for), D the distance to the wall or PMT it meets:

* forced collision (Lux & Koblinger ch. 6): a scatter happens before D with probability
  p_c = 1 - exp(-mu_s D), mu_s = mu_ray + mu_mie, at s drawn from the truncated exponential,
  s = -ln(1 - u p_c) / mu_s; the scattered weight there is w p_c exp(-mu_abs s);
* next-event estimate of that scatter at PMT i (distance d, incidence cos_inc, photocathode solid angle
  Omega): w p_c e^{-mu_abs s} f(k') Omega e^{-mu_tot d} (1 - R_pmt) eps_i(lambda, cos_inc), with the
  phase function per steradian f = (mu_ray/mu_s) 3/(8 pi) (1 - (e.k')^2) (dipole pattern of linearly
  polarised light, e the polarisation; Jackson 3rd ed. sec. 10.1) + (mu_mie/mu_s) HG(k.k')/(2 pi)
  (Henyey & Greenstein 1941);
* the uncollided weight w e^{-mu_tot D} reaching the wall gives, through Lambertian reflection (Lambert's law,
  cos(theta_out)/pi per sr), w e^{-mu_tot D} R_wall f_diffuse cos_out/pi * Omega * e^{-mu_tot d} (1 - R_pmt)
  eps_i; if it reaches a PMT after a SPECULAR reflection (wall mirror or PMT glass) it is scored there
  directly, w e^{-mu_tot D} (1 - R_pmt) eps_i (the next-event estimate cannot see through a mirror);
* the ray then continues by one branch chosen with a fixed uniform: scatter (probability p_c, weight
  w e^{-mu_abs s}, new direction from the same dipole / HG sampling as the MC, polarisation projected) or
  boundary (weight w e^{-mu_abs D} R, R = R_wall or R_pmt, Lambertian with probability f_diffuse or mirror
  reflection, polarisation randomised or mirrored as in the MC). Rays from the emission that reach a PMT
  unscattered are the direct light and are not scored here. This is an unbiased estimator of the MC's
  indirect light; its variance falls as 1/(traced photons).

eps_i = QE(lambda) qe_scale_i CE A(cos_inc) is :meth:`physics.sensors.PMTResponse.detection_probability`,
Omega is :func:`physics.expected.disk_solid_angle`. A straight line from inside the tank to a photocathode
on the wall is taken as unobstructed (PMTs lie on the convex wall).

Differentiability: the scores are smooth in the medium's absorption/Rayleigh/Mie scales, the wall and PMT
reflectivities, the diffuse fraction and per-PMT QE scales, and in the photons' start positions and
directions (pass photons built from event parameters for gradients in vertex/direction); the first scatter is
fully differentiable in the scattering length, later generations only pathwise (branch choices are fixed).

Units: m, ns, nm; expected charge in photoelectrons. Shapes: E events, P PMTs, M traced photons.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import emission
from .config import ConfigError, check_choice, check_number
from .constants import C_M_PER_NS, PARTICLE_MASS, SHOWER_PARTICLES, TRACK_PARTICLES
from .expected import disk_solid_angle, gauss_legendre
from .optics import (
    dipole_cos_psi,
    henyey_greenstein_cos_theta,
    lambertian_cos_theta,
    project_polarization,
    random_perpendicular,
    rotate_direction,
    specular_reflect,
)
from .records import Photons

__all__ = ["indirect_light", "track_photon_yield", "canonical_photons", "place_photons"]

_INV_PI = 1.0 / math.pi
_DIPOLE = 3.0 / (8.0 * math.pi)


def _inv_len(length: Tensor) -> Tensor:
    """1/L with 1/inf = 0 (process off); differentiable where finite."""
    finite = torch.isfinite(length)
    safe = torch.where(finite, length, torch.ones_like(length))
    return torch.where(finite, 1.0 / safe, torch.zeros_like(length))


def _score_chunk(
    x: Tensor,
    w: Tensor,
    t: Tensor,
    inv_v: Tensor,
    mu_tot: Tensor,
    wl: Tensor,
    ev: Tensor,
    aux: tuple[Tensor, ...],
    kind: str,
    g: float,
    n_events: int,
    det: Any,
    sensors: Any,
    one_minus_rp: Tensor,
) -> tuple[Tensor, Tensor]:
    """Next-event scores of points x (m,3) (weights w (m,)) at every PMT, summed per event: (E, P) p.e. and
    (E, P) p.e. x arrival time. kind 'scatter': aux = (pol, dir, frac_ray, frac_mie) (each (m,3) or (m,));
    kind 'lambert': aux = (normal,) -- the inward wall normal at x (the factor R_w f_d is in w)."""
    pr = det.pmt_radius.to(x)
    # a projection of v = pmt_pos - x (m, P, 3) onto a per-point or per-PMT vector u is u.pmt_pos - u.x:
    # one (m, 3) x (3, P) product each, in float64 (the difference of two wall-sized numbers: float32 would
    # lose the few-cm distances of wall points next to a PMT), no (m, P, 3) tensor
    x64 = x.double()
    pp = det.pmt_pos.to(x64)

    def along(u: Tensor) -> Tensor:  # (m, 3) per-point unit vectors -> (m, P) components of v
        u = u.double()
        return u @ pp.T - (u * x64).sum(-1, keepdim=True)

    d2 = (x64 * x64).sum(-1, keepdim=True) + (pp * pp).sum(-1) - 2.0 * (x64 @ pp.T)
    d = d2.clamp_min(1e-18).sqrt().to(x.dtype).clamp_min(1e-9)
    pn = det.pmt_normal.to(x64)
    inv_d = 1.0 / d
    cos_inc = ((x64 @ pn.T) - (pp * pn).sum(-1)).to(x.dtype) * inv_d
    if kind == "scatter":
        pol, dirn, f_ray, f_mie = aux
        ek = along(pol).to(x.dtype) * inv_d
        phase = f_ray[:, None] * _DIPOLE * (1.0 - ek * ek).clamp_min(0.0)
        if bool((f_mie > 0).any()):
            ck = along(dirn).to(x.dtype) * inv_d
            hg = (1.0 - g * g) / (4.0 * math.pi * (1.0 + g * g - 2.0 * g * ck).clamp_min(1e-12) ** 1.5)
            phase = phase + f_mie[:, None] * hg
    else:
        (nrm,) = aux
        phase = _INV_PI * (along(nrm).to(x.dtype) * inv_d).clamp_min(0.0)
    omega = disk_solid_angle(d, cos_inc, pr[None, :])
    eps = sensors.detection_matrix(wl, cos_inc.clamp(0.0, 1.0))
    sc = w[:, None] * phase * omega * torch.exp(-mu_tot[:, None] * d) * one_minus_rp * eps
    sc = torch.where(cos_inc > 0, sc, torch.zeros_like(sc))
    zero = sc.new_zeros(n_events, sc.shape[1])
    return zero.index_add(0, ev, sc), zero.index_add(0, ev, sc * (t[:, None] + d * inv_v[:, None]))


def _score_points(
    x: Tensor,
    w: Tensor,
    t: Tensor,
    inv_v: Tensor,
    mu_tot: Tensor,
    wl: Tensor,
    ev: Tensor,
    kind: str,
    aux: tuple[Tensor, ...],
    g: float,
    n_events: int,
    det: Any,
    sensors: Any,
    one_minus_rp: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """:func:`_score_chunk` over chunks of ``chunk`` points, summed: (E, P), (E, P). Under autograd each chunk
    is checkpointed (recomputed in the backward pass), so memory stays O(chunk x P) instead of O(M x P)."""
    from torch.utils.checkpoint import checkpoint

    mu = wt = None
    for a in range(0, x.shape[0], chunk):
        sl = slice(a, a + chunk)
        args = (
            x[sl],
            w[sl],
            t[sl],
            inv_v[sl],
            mu_tot[sl],
            wl[sl],
            ev[sl],
            tuple(z[sl] for z in aux),
            kind,
            g,
            n_events,
            det,
            sensors,
            one_minus_rp,
        )
        if torch.is_grad_enabled():
            m, s = checkpoint(_score_chunk, *args, use_reentrant=False)
        else:
            m, s = _score_chunk(*args)
        mu, wt = (m, s) if mu is None else (mu + m, wt + s)
    return mu, wt


def indirect_light(
    photons: Photons,
    detector: Any,
    medium: Any,
    optics: Any,
    sensors: Any,
    n_events: int,
    generator: torch.Generator,
    *,
    weight: Tensor | float = 1.0,
    polarization: Tensor | None = None,
    max_rounds: int = 6,
    min_weight: float = 1e-4,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Expected indirect p.e. per event and PMT from traced ``photons`` (see the module docstring).

    photons: Photons (M rows: pos (M,3) m, dir (M,3), t (M,) ns, wavelength (M,) nm, event (M,) long in
    [0, n_events)); weight: photons each traced row stands for (scalar or (M,); e.g. N_emitted / M_traced);
    polarization: (M,3) linear polarisation (Cherenkov: in the plane of photon and track) or None for
    unpolarised light (random, from ``generator``). optics: :class:`physics.optics.Optics` (R_wall, f_diffuse,
    R_pmt); sensors: :class:`physics.sensors.PMTResponse`. ``max_rounds`` interactions are followed per photon
    (rays whose weight falls below ``min_weight`` x the initial one are dropped); ``chunk`` rays are scored
    against all PMTs at a time (memory ~ 60 bytes x chunk x P).

    Returns {'mu': (E, P) expected indirect p.e., 't_mean': (E, P) its mean arrival time [ns] (0 where
    mu = 0), 'w_t': (E, P) sum of mu x t}. Differentiable as described in the module docstring.
    """
    n_events = check_number(n_events, "n_events", minimum=1, integer=True)
    max_rounds = check_number(max_rounds, "max_rounds", minimum=1, integer=True)
    chunk = check_number(chunk, "chunk", minimum=1, integer=True)
    m0 = len(photons)
    pos, dirn, t, wl, ev = photons.pos, photons.dir, photons.t, photons.wavelength, photons.event
    dtype, dev = pos.dtype, pos.device
    if m0 and (int(ev.min()) < 0 or int(ev.max()) >= n_events):
        raise ConfigError(
            f"photons.event: values in [{int(ev.min())}, {int(ev.max())}], allowed: [0, n_events={n_events})"
        )
    w = torch.as_tensor(weight, dtype=dtype, device=dev)
    w = w.expand(m0) if w.dim() == 0 else w
    if w.shape != (m0,):
        raise ConfigError(f"weight: got shape {tuple(w.shape)}, allowed: scalar or ({m0},)")
    n_p = int(detector.n_pmts)
    mu = torch.zeros(n_events, n_p, dtype=dtype, device=dev)
    wt = torch.zeros_like(mu)
    if m0 == 0:
        return {"mu": mu, "t_mean": wt.clone(), "w_t": wt}
    # per-photon constants: the wavelength never changes
    mu_a = _inv_len(medium.absorption_length(wl).to(dtype))
    mu_r = _inv_len(medium.rayleigh_length(wl).to(dtype))
    mu_m = _inv_len(medium.mie_length(wl).to(dtype))
    g = float(getattr(medium, "mie_g", 0.0))
    inv_v = (medium.group_index(wl) / C_M_PER_NS).to(dtype)
    r_w = optics.wall_reflectivity.to(dtype)
    f_d = optics.diffuse_fraction.to(dtype)
    r_p = optics.pmt_reflectivity.to(dtype)
    one_minus_rp = 1.0 - r_p
    if polarization is None:
        pol = random_perpendicular(dirn, torch.rand(m0, generator=generator, device=dev, dtype=dtype))
    else:
        if polarization.shape != dirn.shape:
            raise ConfigError(
                f"polarization: got shape {tuple(polarization.shape)}, allowed: {tuple(dirn.shape)} or None"
            )
        pol = project_polarization(
            polarization.to(dtype),
            dirn,
            lambda: random_perpendicular(dirn, torch.rand(m0, generator=generator, device=dev, dtype=dtype)),
        )
    spec = torch.zeros(m0, dtype=torch.bool, device=dev)  # last vertex specular (score PMT hits directly)
    idx = torch.arange(m0, device=dev)  # row into the per-photon constants
    w_floor = min_weight * w.detach()

    for _ in range(max_rounds):
        if pos.shape[0] == 0:
            break
        mr, mm, ma = mu_r[idx], mu_m[idx], mu_a[idx]
        ms = mr + mm
        mt = ma + ms
        iv, lam, e_ = inv_v[idx], wl[idx], ev[idx]
        d_wall, n_wall = detector.wall_intersect(pos, dirn)
        d_wall = d_wall.to(dtype)
        with torch.no_grad():
            pmt, _, _ = detector.pmt_intersect(pos.detach(), dirn.detach(), d_wall.detach())
        on_pmt = pmt >= 0
        pk = pmt.clamp_min(0)
        c_p, n_p_hit = detector.pmt_pos.to(pos)[pk], detector.pmt_normal.to(pos)[pk]
        dn = (dirn * n_p_hit).sum(-1)
        dn_safe = torch.where(on_pmt, dn, -torch.ones_like(dn))
        d_pmt = ((c_p - pos) * n_p_hit).sum(-1) / dn_safe
        big_d = torch.where(on_pmt, d_pmt, d_wall)
        u = torch.rand((pos.shape[0], 5), generator=generator, device=dev, dtype=dtype)
        # forced collision on [0, D)
        p_c = -torch.expm1(-ms * big_d)
        has_s = ms > 0
        ms_safe = torch.where(has_s, ms, torch.ones_like(ms))
        s = -torch.log1p(-u[:, 0] * p_c) / ms_safe
        s = torch.where(has_s, s, torch.zeros_like(s))
        w_s = w * p_c * torch.exp(-ma * s)
        x_s = pos + s[:, None] * dirn
        t_s = t + s * iv
        f_ray = torch.where(has_s, mr / ms_safe, torch.zeros_like(ms))
        f_mie = torch.where(has_s, mm / ms_safe, torch.zeros_like(ms))
        sc = torch.nonzero(has_s).squeeze(1)
        if sc.numel():
            sm, swt = _score_points(
                x_s[sc],
                w_s[sc],
                t_s[sc],
                iv[sc],
                mt[sc],
                lam[sc],
                e_[sc],
                "scatter",
                (pol[sc], dirn[sc], f_ray[sc], f_mie[sc]),
                g,
                n_events,
                detector,
                sensors,
                one_minus_rp,
                chunk,
            )
            mu, wt = mu + sm, wt + swt
        # the uncollided ray at its boundary
        w_b = w * torch.exp(-mt * big_d)
        x_b = pos + big_d[:, None] * dirn
        t_b = t + big_d * iv
        at_wall = ~on_pmt
        wl_idx = torch.nonzero(at_wall).squeeze(1)
        if wl_idx.numel():
            sm, swt = _score_points(
                x_b[wl_idx],
                (w_b * r_w * f_d)[wl_idx],
                t_b[wl_idx],
                iv[wl_idx],
                mt[wl_idx],
                lam[wl_idx],
                e_[wl_idx],
                "lambert",
                (n_wall.to(dtype)[wl_idx],),
                g,
                n_events,
                detector,
                sensors,
                one_minus_rp,
                chunk,
            )
            mu, wt = mu + sm, wt + swt
        hit = torch.nonzero(on_pmt & spec).squeeze(1)  # emission rays start with spec False (direct)
        if hit.numel():
            cos_h = (-dn[hit]).clamp(0.0, 1.0)
            eps = sensors.detection_probability(lam[hit], cos_h, pmt[hit])
            sh = w_b[hit] * one_minus_rp * eps
            flat = e_[hit] * n_p + pmt[hit]
            mu = (mu.reshape(-1).index_add(0, flat, sh)).view(n_events, n_p)
            wt = (wt.reshape(-1).index_add(0, flat, sh * t_b[hit])).view(n_events, n_p)
        # continue one branch per ray (fixed uniforms)
        go_s = u[:, 1] < p_c
        refl_r = torch.where(on_pmt, r_p, r_w)
        w_next = torch.where(go_s, w * torch.exp(-ma * s), w * torch.exp(-ma * big_d) * refl_r)
        x_next = torch.where(go_s[:, None], x_s, x_b)
        t_next = torch.where(go_s, t_s, t_b)
        # scatter direction: dipole about the polarisation (Rayleigh) or HG about the direction (Mie)
        phi = (2.0 * math.pi) * u[:, 3]
        is_mie = go_s & (u[:, 4] < f_mie)
        new_dir = rotate_direction(pol, dipole_cos_psi(u[:, 2]), phi)
        if bool(is_mie.any()):
            new_dir = torch.where(
                is_mie[:, None], rotate_direction(dirn, henyey_greenstein_cos_theta(u[:, 2], g), phi), new_dir
            )
        nrm = torch.where(on_pmt[:, None], n_p_hit, n_wall.to(dtype))  # inward normal at the surface
        diffuse = ~go_s & ~on_pmt & (u[:, 4] < f_d)
        mirrored = specular_reflect(dirn, nrm)
        lambert = rotate_direction(nrm, lambertian_cos_theta(u[:, 2]), phi)
        refl_dir = torch.where(diffuse[:, None], lambert, mirrored)
        new_dir = torch.where(go_s[:, None], new_dir, refl_dir)
        rnd_pol = random_perpendicular(new_dir, u[:, 4])
        pol_refl = torch.where(diffuse[:, None], rnd_pol, specular_reflect(pol, nrm))
        pol_next = torch.where(go_s[:, None], project_polarization(pol, new_dir, rnd_pol), pol_refl)
        spec = ~go_s & ~diffuse
        eps_in = 1e-7 * max(float(detector.radius), 1.0)
        x_next = torch.where(go_s[:, None], x_next, x_next + eps_in * nrm)
        keep = torch.nonzero(w_next.detach() > w_floor[idx]).squeeze(1)
        pos, dirn, pol, t, w = x_next[keep], new_dir[keep], pol_next[keep], t_next[keep], w_next[keep]
        spec, idx = spec[keep], idx[keep]
    t_mean = torch.where(mu > 0, wt / torch.where(mu > 0, mu, torch.ones_like(mu)), torch.zeros_like(mu))
    return {"mu": mu, "t_mean": t_mean, "w_t": wt}


# ----------------------------------------------------------------------------------------------------------
# traced photons for an event hypothesis (used by fitting.response.PhysicsResponse)
# ----------------------------------------------------------------------------------------------------------
def track_photon_yield(particle: str, energy: Tensor, medium: Any, n_nodes: int = 48) -> Tensor:
    """Mean Cherenkov photons (band of ``medium``) of a stopping track of kinetic energy ``energy`` (E,) MeV:

    Y(E) = int_{T_th}^{E} (dN/dx)(beta(T)) / S(T) dT (Frank-Tamm photons per metre over the mean stopping
    power, continuous slowing down; PDG RPP "Passage of particles through matter" eqs. 34.5 and 34.45),
    Gauss-Legendre in T. Differentiable in ``energy``; 0 below threshold."""
    check_choice(particle, "particle", TRACK_PARTICLES)
    mass = PARTICLE_MASS[particle]
    e = torch.as_tensor(energy).to(torch.float64)
    b_th = emission.cherenkov_threshold_beta(medium)
    t_th = mass * (1.0 / math.sqrt(1.0 - b_th * b_th) - 1.0)
    x, w = gauss_legendre(n_nodes, 0.0, 1.0, device=e.device)
    span = (e - t_th).clamp_min(0.0)
    t = t_th + span[..., None] * x  # (E, n)
    gamma = 1.0 + t / mass
    beta = torch.sqrt((1.0 - 1.0 / (gamma * gamma)).clamp_min(0.0))
    rate = emission.frank_tamm_yield(beta, medium) / emission.bethe_dedx(
        t, mass, medium, spin_half=particle.startswith("mu")
    )
    return span * (rate * w).sum(-1)


def canonical_photons(
    particle: str,
    energy: Tensor,
    medium: Any,
    n_trace: int,
    generator: torch.Generator,
    *,
    source_wavelength: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Photons, Tensor, Tensor | None]:
    """Photons of E events in the event frame (vertex at the origin, direction +z, t0 = 0), about ``n_trace``
    per event, from the simulator's own emission (physics.emission, with ``generator``): tracks
    (track_steps + cherenkov_photons, multiple scattering included), showers (shower_photons) or the
    isotropic source (n_trace photons, wavelength ``source_wavelength`` or uniform in the band). energy: (E,)
    kinetic energies [MeV] (for the source only its length E is used).

    Returns (photons, weight (M,) = emitted photons each stands for (1 for the source: scale by N / n_trace),
    polarization (M,3) or None). Cherenkov light is polarised in the plane of the photon and its radiating
    particle, as the simulator emits it (physics.emission.cherenkov_polarization: each step's direction for
    tracks, the cascade axis for showers)."""
    n_trace = check_number(n_trace, "n_trace", minimum=1, integer=True)
    e = torch.as_tensor(energy, dtype=torch.float64).reshape(-1)
    n_ev = e.shape[0]
    zeros = torch.zeros(n_ev, 3)
    ez = torch.tensor([[0.0, 0.0, 1.0]]).expand(n_ev, 3)
    if particle == "isotropic":
        wl = 0.5 * (medium.wl_min + medium.wl_max) if source_wavelength is None else source_wavelength
        spec = (medium.wl_min, medium.wl_max) if source_wavelength is None else float(wl)
        ph = emission.isotropic_source(zeros.to(dtype), n_trace, generator, wavelength=spec, dtype=dtype)
        return ph, torch.ones(len(ph), dtype=dtype), None
    if particle in TRACK_PARTICLES:
        expect = track_photon_yield(particle, e, medium)
        thin = float((n_trace / expect.clamp_min(1.0)).clamp(max=1.0).min())
        steps = emission.track_steps(particle, e, zeros, ez, medium, generator)
        ph, pol = emission.cherenkov_photons(steps, medium, generator, thin=thin, with_polarization=True)
    elif particle in SHOWER_PARTICLES:
        pilot = emission.shower_photons(particle, e, zeros, ez, medium, generator, thin=1e-3)
        per_ev = torch.bincount(pilot.event, minlength=n_ev).double() / 1e-3
        thin = float((n_trace / per_ev.clamp_min(1.0)).clamp(max=1.0).min())
        ph, pol = emission.shower_photons(
            particle, e, zeros, ez, medium, generator, thin=thin, with_polarization=True
        )
    else:
        raise ConfigError(
            f"particle: got {particle!r}, allowed: {TRACK_PARTICLES + SHOWER_PARTICLES} or 'isotropic'"
        )
    ph = Photons(
        pos=ph.pos.to(dtype),
        dir=ph.dir.to(dtype),
        t=ph.t.to(dtype),
        wavelength=ph.wavelength.to(dtype),
        event=ph.event,
    )
    return ph, torch.full((len(ph),), 1.0 / thin, dtype=dtype), pol.to(dtype)


def place_photons(
    photons: Photons,
    polarization: Tensor | None,
    vertex: Tensor,
    direction: Tensor,
    reference: Tensor,
    t0: Tensor | None = None,
) -> tuple[Photons, Tensor | None]:
    """Rigid motion of event-frame photons to the event: x = v + R k_local, R = [e1 e2 d] with
    e1 = normalise(r - (r.d) d), e2 = d x e1 for the event's ``reference`` vector r (E,3) (fixed during a fit,
    so the frame turns continuously with d; any r not parallel to d). Differentiable in vertex (E,3),
    direction (E,3) (normalised here) and t0 (E,)."""
    d = direction / direction.norm(dim=-1, keepdim=True)
    r = reference.to(d)
    e1 = r - (r * d).sum(-1, keepdim=True) * d
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    e2 = torch.cross(d, e1, dim=-1)
    ev = photons.event
    basis = torch.stack([e1, e2, d], 1)[ev]  # (M, 3 local axes, 3 xyz)
    pos = vertex[ev] + (photons.pos.to(d)[:, :, None] * basis).sum(1)
    dirn = (photons.dir.to(d)[:, :, None] * basis).sum(1)
    t = photons.t.to(d) + (0.0 if t0 is None else t0[ev])
    pol = None if polarization is None else (polarization.to(d)[:, :, None] * basis).sum(1)
    return Photons(pos=pos, dir=dirn, t=t, wavelength=photons.wavelength.to(d), event=ev), pol
