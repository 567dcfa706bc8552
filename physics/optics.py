"""Monte-Carlo optical-photon transport ("sample" face of the optics stage).

Photons travel in straight lines between interactions. In every *round* each live photon draws its
distance to the next volume interaction, ``s = -ln(u) / mu_tot`` with ``mu_tot = 1/L_abs + 1/L_ray + 1/L_mie``
(the minimum of independent exponentials is exponential with the summed rate, and the process is then
chosen with probability ``mu_i / mu_tot``; Lux & Koblinger, *Monte Carlo Particle Transport Methods*,
CRC 1991, ch. 2), and the distances to the
detector wall and to the first PMT photocathode along the ray. The nearest wins:

* absorption: the photon dies;
* Rayleigh scattering of linearly polarised light: the new direction k' follows the dipole pattern
  ``p ~ 1 - (e.k')^2`` about the polarisation e (Jackson, *Classical Electrodynamics*, 3rd ed., sec. 10.1;
  the algorithm of Geant4's G4OpRayleigh, sampled exactly), the new polarisation is e projected
  perpendicular to k'. Averaged over e (unpolarised light) this is ``p(cos t) = 3/8 (1 + cos^2 t)`` about
  the old direction (Rayleigh 1871; Jackson eq. 10.34). Photons carry a polarisation: given (e.g. Cherenkov
  light is polarised in the plane of the photon and the track, Jelley, *Cerenkov Radiation*, 1958) or, by
  default, random (unpolarised light);
* Mie scattering: Henyey-Greenstein, ``p(cos t) = (1-g^2) / (2 (1 + g^2 - 2 g cos t)^{3/2})``
  (Henyey & Greenstein, ApJ 93 (1941) 70), exact inverse CDF;
* PMT photocathode: specular reflection off the glass with probability ``pmt_reflectivity``, otherwise a
  :class:`~physics.records.CathodeHits` row (detection efficiency is the sensor stage's job);
* wall: reflected with probability ``wall_reflectivity``, Lambertian (cosine-weighted about the inward
  normal, Lambert 1760) with probability ``diffuse_fraction`` else specular (``d' = d - 2 (d.n) n``);
  otherwise absorbed. Polarisation is mirrored by specular reflections and randomised by diffuse ones.

Time advances with the group velocity ``v_g = c / n_g(lambda)``, ``n_g = n - lambda dn/dlambda``
(Jackson eq. 7.88). Photons are processed in chunks (bounded memory), and in each round only the live
photons are kept (compaction with ``index_select``). Upstream thinning (emission's ``thin``) is untouched.

Two implementations of these rules (``Optics(backend=...)``): the round-by-round tensor transport below
(any device, autograd-free) and, on CPU, the fused Numba kernel of :mod:`physics.transport_cpu`, which
follows each photon to its death in one compiled loop (float64, own random streams, same decisions; tested
against each other statistically in tests/test_transport_cpu.py).

Units: positions m, times ns, wavelengths nm; directions are unit vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ConfigError, check_choice, check_keys, check_number
from .constants import C_M_PER_NS
from .geometry import components, select
from .records import CathodeHits, Photons, WallHits

__all__ = [
    "Optics",
    "PhotonState",
    "rayleigh_cos_theta",
    "henyey_greenstein_cos_theta",
    "lambertian_cos_theta",
    "dipole_cos_psi",
    "random_perpendicular",
    "project_polarization",
    "rotate_direction",
    "specular_reflect",
    "orthonormal_basis",
]


# --------------------------------------------------------------------------------------------------
# pure kernels
# --------------------------------------------------------------------------------------------------
def rayleigh_cos_theta(u: Tensor) -> Tensor:
    """Exact inverse CDF of the unpolarised Rayleigh phase function ``p(c) = 3/8 (1 + c^2)``, c in [-1, 1].

    ``F(c) = 3/8 (c + c^3/3 + 4/3) = u`` is the depressed cubic ``c^3 + 3c - (8u - 4) = 0`` whose single real
    root (Cardano) is ``c = w - 1/w`` with ``w = cbrt(A + sqrt(A^2 + 1))``, ``A = 4u - 2`` (``w > 0`` always).
    u: (N,) uniforms in [0, 1) -> (N,) cos(theta). Mean of c^2 is 2/5.
    """
    a = 4.0 * u - 2.0
    w = torch.pow(a + torch.sqrt(a * a + 1.0), 1.0 / 3.0)
    return (w - 1.0 / w).clamp(-1.0, 1.0)


def henyey_greenstein_cos_theta(u: Tensor, g: float | Tensor) -> Tensor:
    """Inverse CDF of Henyey-Greenstein (ApJ 93 (1941) 70) with asymmetry g = <cos theta> in (-1, 1).

    ``c = (1 + g^2 - ((1 - g^2) / (1 - g + 2 g u))^2) / (2 g)``; isotropic ``c = 2u - 1`` for |g| < 1e-6.
    u: (N,) uniforms in [0, 1) -> (N,) cos(theta).
    """
    g = torch.as_tensor(g, dtype=u.dtype, device=u.device)
    small = g.abs() < 1e-6
    gs = torch.where(small, torch.ones_like(g), g)
    frac = (1.0 - gs * gs) / (1.0 - gs + 2.0 * gs * u)
    c = (1.0 + gs * gs - frac * frac) / (2.0 * gs)
    return torch.where(small, 2.0 * u - 1.0, c).clamp(-1.0, 1.0)


def dipole_cos_psi(u: Tensor) -> Tensor:
    """Exact inverse CDF of ``p(x) = 3/4 (1 - x^2)``, x = cos(psi) between the scattered direction and the
    incident linear polarisation (dipole radiation of the induced moment, Jackson 3rd ed. sec. 10.1 / 9.2).

    ``F(x) = (2 + 3x - x^3)/4 = u`` has the root ``x = 2 cos((acos(1 - 2u) - 2 pi)/3)`` in [-1, 1]
    (trigonometric solution of the depressed cubic). u: (N,) uniforms -> (N,). <x^2> = 1/5.
    """
    x = 2.0 * torch.cos((torch.acos((1.0 - 2.0 * u).clamp(-1.0, 1.0)) - 2.0 * math.pi) / 3.0)
    return x.clamp(-1.0, 1.0)


def random_perpendicular(d: Tensor, u: Tensor) -> Tensor:
    """Unit vectors (N,3) perpendicular to unit d (N,3) at azimuth 2 pi u (u (N,) uniforms): a random linear
    polarisation, i.e. unpolarised light on average.

    cos(a) e1 + sin(a) e2 with (e1, e2) = :func:`orthonormal_basis` (d), evaluated component by component
    (same operations in the same order, hence bit-identical, without the (N,3) temporaries)."""
    a = (2.0 * math.pi) * u
    c, s = torch.cos(a), torch.sin(a)
    e1, e2 = _basis_components(d)
    return _stack3([c * e1[j] + s * e2[j] for j in range(3)])


def _stack3(cols: list[Tensor]) -> Tensor:
    """``torch.stack(cols, -1)`` for three (N,) tensors: (N,3). On CPU without autograd through NumPy, whose
    interleaving copy is ~4x faster than torch's in torch 2.x. Same values."""
    if cols[0].device.type == "cpu" and not (torch.is_grad_enabled() and any(c.requires_grad for c in cols)):
        return torch.from_numpy(np.stack([c.detach().numpy() for c in cols], 1))
    return torch.stack(cols, -1)


def _basis_components(d: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`orthonormal_basis` of d (N,3) as component lists [e1x, e1y, e1z], [e2x, e2y, e2z] (each (N,)),
    with the same operations in the same order (bit-identical)."""
    x, y, z = d.unbind(-1) if d.requires_grad or d.device.type != "cpu" else components(d)
    sign = select(z >= 0, torch.ones_like(z), -1.0)
    k = -1.0 / (sign + z)
    b = x * y * k
    sx = sign * x
    return [1.0 + sx * x * k, sign * b, -sx], [b, sign + y * y * k, -y]


def project_polarization(pol: Tensor, d: Tensor, fallback: Tensor | Callable[[], Tensor]) -> Tensor:
    """New linear polarisation after scattering into d: the old one projected perpendicular to d, normalised
    (Geant4 G4OpRayleigh convention); ``fallback`` (N,3) (or a callable making it, called only when needed)
    where the projection vanishes."""
    px, py, pz = pol.unbind(-1)
    dx, dy, dz = d.unbind(-1)
    p = pol - (px * dx + py * dy + pz * dz)[..., None] * d
    nrm = p.norm(dim=-1, keepdim=True)
    ok = nrm > 1e-6
    p = p / nrm.clamp_min(1e-30)
    if bool(ok.all()):
        return p
    return select(ok, p, fallback() if callable(fallback) else fallback)


def lambertian_cos_theta(u: Tensor) -> Tensor:
    """Lambert's cosine law: ``p(c) = 2c`` on [0, 1] (cosine-weighted hemisphere), ``c = sqrt(u)``;
    <c> = 2/3."""
    return torch.sqrt(u)


def orthonormal_basis(d: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors (N,3) completing unit vectors d (N,3) to a right-handed orthonormal basis.

    Branch-free construction of Duff et al., "Building an orthonormal basis, revisited", JCGT 6 (2017) 1.
    """
    x, y, z = d.unbind(-1)
    sign = select(z >= 0, torch.ones_like(z), -1.0)
    a = -1.0 / (sign + z)
    b = x * y * a
    e1 = torch.stack([1.0 + sign * x * x * a, sign * b, -sign * x], -1)
    e2 = torch.stack([b, sign + y * y * a, -y], -1)
    return e1, e2


def rotate_direction(axis: Tensor, cos_t: Tensor, phi: Tensor) -> Tensor:
    """Unit vectors at polar angle acos(cos_t) and azimuth phi about unit ``axis``.

    axis (N,3), cos_t (N,), phi (N,) [rad] -> (N,3) = cos_t axis + sin_t (cos phi e1 + sin phi e2).
    """
    e1, e2 = _basis_components(axis)
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0))
    sc, ss = sin_t * torch.cos(phi), sin_t * torch.sin(phi)
    a = axis.unbind(-1)
    out = _stack3([cos_t * a[j] + sc * e1[j] + ss * e2[j] for j in range(3)])  # component-wise
    return out / out.norm(dim=-1, keepdim=True)


def specular_reflect(d: Tensor, n: Tensor) -> Tensor:
    """Mirror reflection ``d' = d - 2 (d.n) n`` of directions d (N,3) about unit normals n (N,3)."""
    return d - 2.0 * (d * n).sum(-1, keepdim=True) * n


# --------------------------------------------------------------------------------------------------
# transport state
# --------------------------------------------------------------------------------------------------
@dataclass
class PhotonState:
    """Live photons during transport (all (N,...) on one device).

    pos (N,3) m, dir (N,3), pol (N,3) unit linear polarisation perpendicular to dir, t (N,) ns,
    wavelength (N,) nm, event (N,) long, n_scatter / n_reflect (N,) int32, inv_v (N,) ns/m = n_g/c,
    inv_mu (N,) m = 1/mu_tot (inf when nothing interacts), p_abs (N,) = mu_abs/mu_tot,
    p_ray (N,) = (mu_abs + mu_ray)/mu_tot (cumulative; the rest is Mie).
    """

    pos: Tensor
    dir: Tensor
    pol: Tensor
    t: Tensor
    wavelength: Tensor
    event: Tensor
    n_scatter: Tensor
    n_reflect: Tensor
    inv_v: Tensor
    inv_mu: Tensor
    p_abs: Tensor
    p_ray: Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def index_select(self, idx: Tensor) -> PhotonState:
        """Rows ``idx`` (long) of every field (compaction)."""
        return PhotonState(**{f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)})


_CONFIG_KEYS = (
    "wall_reflectivity",
    "diffuse_fraction",
    "pmt_reflectivity",
    "max_rounds",
    "chunk_size",
    "backend",
)
BACKENDS = ("auto", "torch", "numba")


class Optics(nn.Module):
    """Monte-Carlo optics stage: photons -> photocathode hits (and optionally wall arrivals).

    Parameters (0-dim ``nn.Parameter``, free for calibration through a differentiable face; the MC face
    uses their detached values): ``wall_reflectivity`` R_w in [0, 1], ``diffuse_fraction`` f_d in [0, 1]
    (Lambertian share of wall reflections, the rest specular), ``pmt_reflectivity`` R_p in [0, 1]
    (specular reflection off the PMT glass). ``max_rounds`` caps the transport rounds (photons still alive
    after it are dropped and counted in ``last_stats['truncated']``); ``chunk_size`` photons are transported
    at a time (memory ~ 250 bytes per photon of a chunk on top of the input).

    ``backend``: 'torch' transports round by round with tensor operations (any device; the only choice for
    ``record_wall`` / ``use_pmts=False`` runs); 'numba' follows each photon to its death in the fused CPU
    kernel of :mod:`physics.transport_cpu` (same physics, own random streams, ~4x faster on CPU); 'auto'
    (default) takes 'numba' for CPU runs with photocathodes and 'torch' otherwise.

    The defaults (R_w 0.1, f_d 1.0, R_p 0.1) are illustrative values for a black-sheet-lined water tank
    and 8-20" PMT glass; set them from measurement/calibration.
    """

    def __init__(
        self,
        wall_reflectivity: float = 0.1,
        diffuse_fraction: float = 1.0,
        pmt_reflectivity: float = 0.1,
        max_rounds: int = 100,
        chunk_size: int = 1_000_000,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        wall_reflectivity = check_number(wall_reflectivity, "wall_reflectivity", minimum=0.0, maximum=1.0)
        diffuse_fraction = check_number(diffuse_fraction, "diffuse_fraction", minimum=0.0, maximum=1.0)
        pmt_reflectivity = check_number(pmt_reflectivity, "pmt_reflectivity", minimum=0.0, maximum=1.0)
        self.max_rounds = check_number(max_rounds, "max_rounds", minimum=1, integer=True)
        self.chunk_size = check_number(chunk_size, "chunk_size", minimum=1, integer=True)
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.wall_reflectivity = nn.Parameter(torch.tensor(wall_reflectivity))
        self.diffuse_fraction = nn.Parameter(torch.tensor(diffuse_fraction))
        self.pmt_reflectivity = nn.Parameter(torch.tensor(pmt_reflectivity))
        self.last_stats: dict[str, int] = {}
        self._medium_tab: tuple[tuple, Any] | None = None  # (key, table): last fused-kernel medium table

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Optics:
        """Build from a mapping with optional keys wall_reflectivity, diffuse_fraction, pmt_reflectivity
        (numbers in [0, 1]), max_rounds (int >= 1), chunk_size (int >= 1), backend (one of BACKENDS). Bad
        values raise ConfigError."""
        check_keys(cfg, required=(), optional=_CONFIG_KEYS, where="optics config")
        return cls(**dict(cfg))

    def extra_repr(self) -> str:
        return (
            f"wall_reflectivity={float(self.wall_reflectivity):.3g}, "
            f"diffuse_fraction={float(self.diffuse_fraction):.3g}, "
            f"pmt_reflectivity={float(self.pmt_reflectivity):.3g}, max_rounds={self.max_rounds}, "
            f"chunk_size={self.chunk_size}, backend={self.backend!r}"
        )

    # ----------------------------------------------------------------------------------------------
    def init_state(
        self,
        photons: Photons,
        medium: Any,
        generator: torch.Generator | None = None,
        polarization: Tensor | None = None,
    ) -> PhotonState:
        """Transport state for ``photons`` in ``medium`` (wavelength-dependent coefficients evaluated once).

        polarization: (N,3) linear polarisation (made perpendicular to dir and normalised here) or None for
        unpolarised light (a random polarisation perpendicular to dir, drawn from ``generator``).

        mu_abs = 1/absorption_length(lambda), mu_ray = 1/rayleigh_length(lambda),
        mu_mie = 1/mie_length(lambda) (the medium's lengths, which carry its abs/rayleigh/mie scales);
        inv_v = group_index(lambda)/c.
        """
        wl = photons.wavelength
        dtype = photons.pos.dtype
        with torch.no_grad():
            mu_a = _inverse_length(medium.absorption_length(wl), dtype)
            mu_r = _inverse_length(medium.rayleigh_length(wl), dtype)
            mu_ar = mu_a + mu_r
            if getattr(medium, "mie_enabled", True):
                mu_tot = mu_ar + _inverse_length(medium.mie_length(wl), dtype)
            else:  # Mie off: 1/inf = 0 and mu_ar + 0 == mu_ar exactly
                mu_tot = mu_ar
            pos_mu = mu_tot > 0
            if bool(pos_mu.all()):  # the usual case: no guards needed (same values as below)
                inv_mu, p_abs, p_ray = 1.0 / mu_tot, mu_a / mu_tot, mu_ar / mu_tot
            else:
                safe = select(pos_mu, mu_tot, 1.0)
                inv_mu = select(pos_mu, 1.0 / safe, math.inf)
                p_abs = select(pos_mu, mu_a / safe, 1.0)
                p_ray = select(pos_mu, mu_ar / safe, 1.0)
            inv_v = (medium.group_index(wl) / C_M_PER_NS).to(dtype)
        n = wl.shape[0]
        d = photons.dir

        def rnd_pol() -> Tensor:
            return random_perpendicular(d, torch.rand(n, generator=generator, device=d.device, dtype=dtype))

        if polarization is None:
            pol = rnd_pol()
        else:
            if polarization.shape != d.shape:
                raise ConfigError(
                    f"polarization: got shape {tuple(polarization.shape)}, allowed: "
                    f"{tuple(d.shape)} (one vector per photon) or None"
                )
            pol = project_polarization(polarization.to(dtype), d, rnd_pol)
        zeros = torch.zeros(n, dtype=torch.int32, device=wl.device)
        return PhotonState(
            pos=photons.pos,
            dir=d,
            pol=pol,
            t=photons.t,
            wavelength=wl,
            event=photons.event,
            n_scatter=zeros,
            n_reflect=zeros.clone(),
            inv_v=inv_v,
            inv_mu=inv_mu,
            p_abs=p_abs,
            p_ray=p_ray,
        )

    def step(
        self,
        state: PhotonState,
        detector: Any,
        medium: Any,
        generator: torch.Generator,
        record_wall: bool = False,
        use_pmts: bool = True,
    ) -> tuple[PhotonState, CathodeHits | None, WallHits | None]:
        """One transport round of every photon in ``state``.

        Returns (surviving photons, photocathode hits of this round or None, wall arrivals or None).
        ``use_pmts=False`` ignores the photocathodes (bare wall: validation against tracked Geant4 runs).
        """
        m = len(state)
        dev, dtype = state.pos.device, state.pos.dtype
        pos, d = state.pos, state.dir
        # the ray queries get (N,3) views of contiguous (3, N) component rows, made once per round: the
        # detector's elementwise kernels then run on contiguous memory (same values)
        pos_q, d_q = components(pos).t(), components(d).t()
        u0, u1 = components(torch.rand((m, 2), generator=generator, device=dev, dtype=dtype))
        # distance to the next volume interaction: -ln(u) in (0, inf], times 1/mu_tot (inf: never).
        d_int = -torch.log(u0) * state.inv_mu
        split_wall = hasattr(detector, "wall_distance") and hasattr(detector, "wall_normal")
        have_pmts = use_pmts and int(detector.n_pmts) > 0
        if split_wall and have_pmts and hasattr(detector, "wall_pmt_intersect"):
            # one pass: the PMT look-up's float64 wall geometry also gives the wall distance
            d_wall, surf, pmt, d_pmt, cos_inc = detector.wall_pmt_intersect(pos_q, d_q)
        else:
            if split_wall:  # normals are then evaluated for the reflected photons only
                d_wall, surf = detector.wall_distance(pos_q, d_q)
            else:
                d_wall, n_wall = detector.wall_intersect(pos, d)
            if have_pmts:
                pmt, d_pmt, cos_inc = detector.pmt_intersect(pos_q, d_q, d_wall.to(dtype))
        d_wall = d_wall.to(dtype)
        if have_pmts:
            on_pmt = pmt >= 0  # the detector only reports disks met before the wall
            d_bnd = select(on_pmt, d_pmt.to(dtype), d_wall)
        else:
            d_bnd = d_wall
        is_int = d_int < d_bnd
        step_len = torch.minimum(d_int, d_bnd)
        bad = None
        if not bool(torch.isfinite(step_len).all()):  # outside the detector / numerical failure: drop
            bad = ~torch.isfinite(step_len)
            step_len = select(bad, torch.zeros_like(step_len), step_len)
        new_t = torch.addcmul(state.t, step_len, state.inv_v)

        scat = is_int & (u1 >= state.p_abs)
        mie = scat & (u1 >= state.p_ray)
        is_bnd = ~is_int if bad is None else ~is_int & ~bad
        if have_pmts:
            at_pmt = is_bnd & on_pmt
            at_wall = is_bnd & ~on_pmt
            pmt_refl = at_pmt & (u1 < self.pmt_reflectivity.detach().to(dtype))
            detected = at_pmt & ~pmt_refl
        else:
            at_wall = is_bnd
        wall_refl = at_wall & (u1 < self.wall_reflectivity.detach().to(dtype))
        redirect = scat | wall_refl
        if have_pmts:
            redirect = redirect | pmt_refl

        wall_rec = None
        if record_wall:
            wi = torch.nonzero(at_wall).squeeze(1)
            d_wi = d.index_select(0, wi)
            pos_wi = torch.addcmul(pos.index_select(0, wi), d_wi, step_len.index_select(0, wi)[:, None])
            wall_rec = WallHits(
                pos=pos_wi,
                dir=d_wi,
                t=new_t.index_select(0, wi),
                wavelength=state.wavelength.index_select(0, wi),
                event=state.event.index_select(0, wi),
                n_scatter=state.n_scatter.index_select(0, wi).long(),
                n_reflect=state.n_reflect.index_select(0, wi).long(),
            )
        cath = None
        if have_pmts:
            hi = torch.nonzero(detected).squeeze(1)
            indirect = (state.n_scatter.index_select(0, hi) + state.n_reflect.index_select(0, hi)) > 0
            cath = CathodeHits(
                pmt=pmt.index_select(0, hi),
                t=new_t.index_select(0, hi),
                wavelength=state.wavelength.index_select(0, hi),
                cos_incidence=cos_inc.index_select(0, hi).to(dtype),
                event=state.event.index_select(0, hi),
                indirect=indirect,
            )

        # survivors: scattered or reflected photons, with their new direction
        keep = torch.nonzero(redirect).squeeze(1)
        k = keep.shape[0]
        cols = {f.name: getattr(state, f.name) for f in fields(state)}
        cols["t"] = new_t
        new = PhotonState(**{name: x.index_select(0, keep) for name, x in cols.items()})
        pos_k, len_k = new.pos, step_len.index_select(0, keep)
        new.pos = torch.addcmul(pos_k, new.dir, len_k[:, None])  # moved to the interaction / surface point
        if k:
            dk, pk = new.dir, new.pol
            r = torch.rand((k, 4), generator=generator, device=dev, dtype=dtype)
            k_scat = scat.index_select(0, keep)
            k_mie = mie.index_select(0, keep)
            phi = (2.0 * math.pi) * r[:, 1]
            rnd_pol = None
            # Rayleigh: dipole pattern about the polarisation; Mie: Henyey-Greenstein about the direction
            new_dir = rotate_direction(pk, dipole_cos_psi(r[:, 0]), phi)
            if bool(k_mie.any()):
                g = float(getattr(medium, "mie_g", 0.0))
                hg = rotate_direction(dk, henyey_greenstein_cos_theta(r[:, 0], g), phi)
                new_dir = select(k_mie[:, None], hg, new_dir)
            if not bool(k_scat.all()):
                # reflections: wall (diffuse or specular about the wall normal) or PMT glass (specular)
                if split_wall:
                    nrm = detector.wall_normal(
                        pos_k, dk, d_wall.index_select(0, keep), surf.index_select(0, keep)
                    ).to(dtype)
                else:
                    nrm = n_wall.index_select(0, keep).to(dtype)
                if have_pmts:
                    k_pmt = pmt_refl.index_select(0, keep)
                    if bool(k_pmt.any()):
                        kp = pmt.index_select(0, keep).clamp_min(0)
                        pn = detector.pmt_normal.to(dtype).index_select(0, kp)
                        nrm = select(k_pmt[:, None], pn, nrm)
                k_wall = wall_refl.index_select(0, keep)
                diffuse = k_wall & (r[:, 2] < self.diffuse_fraction.detach().to(dtype))
                refl = ~k_scat
                mirrored = specular_reflect(dk, nrm)
                lambert = rotate_direction(nrm, lambertian_cos_theta(r[:, 0]), phi)
                refl_dir = select(diffuse[:, None], lambert, mirrored)
                new_dir = select(refl[:, None], refl_dir, new_dir)
                # polarisation: mirrored by a specular reflection, randomised by a diffuse one
                rnd_pol = random_perpendicular(new_dir, r[:, 3])
                pk = select((refl & ~diffuse)[:, None], specular_reflect(pk, nrm), pk)
                pk = select(diffuse[:, None], rnd_pol, pk)
                # reflected photons sit on a surface: nudge them inwards so the next ray starts inside
                eps = _surface_eps(detector, dtype)
                new.pos = select(k_scat[:, None], new.pos, new.pos + eps * nrm)
            fallback = rnd_pol if rnd_pol is not None else (lambda: random_perpendicular(new_dir, r[:, 3]))
            new.dir = new_dir
            new.pol = select(k_scat[:, None], project_polarization(pk, new_dir, fallback), pk)
            new.n_scatter = new.n_scatter + k_scat.to(torch.int32)
            new.n_reflect = new.n_reflect + (~k_scat).to(torch.int32)
        self._round_bad = 0 if bad is None else int(bad.sum())
        return new, cath, wall_rec

    # ----------------------------------------------------------------------------------------------
    def sample(
        self,
        photons: Photons,
        detector: Any,
        medium: Any,
        generator: torch.Generator,
        record_wall: bool = False,
        *,
        max_rounds: int | None = None,
        chunk_size: int | None = None,
        use_pmts: bool = True,
        polarization: Tensor | None = None,
    ) -> CathodeHits | tuple[CathodeHits, WallHits]:
        """Transport ``photons`` through ``medium`` inside ``detector``.

        photons: :class:`Photons` (N rows, any device; the generator must live on the same device type).
        Returns CathodeHits (rows sorted by event, stable) or (CathodeHits, WallHits) when ``record_wall``
        (every arrival at the wall, including those then reflected; n_scatter/n_reflect counted before it).
        polarization: optional (N,3) linear polarisation per photon (default: unpolarised light).
        ``use_pmts=False`` transports to the bare wall (no photocathodes; for tracked-Geant4 validation).
        Photons starting outside the detector are dropped. ``self.last_stats`` then holds the counts:
        photons, outside, steps (photon-rounds), rounds, truncated (alive at the round cap), lost (non-finite
        geometry), cathode_hits, wall_hits.
        """
        max_rounds = (
            self.max_rounds
            if max_rounds is None
            else check_number(max_rounds, "max_rounds", minimum=1, integer=True)
        )
        chunk = (
            self.chunk_size
            if chunk_size is None
            else check_number(chunk_size, "chunk_size", minimum=1, integer=True)
        )
        dev = photons.pos.device
        if generator.device.type != dev.type:
            raise ConfigError(
                f"generator: device {generator.device} does not match the photons' device "
                f"{dev}; allowed: a torch.Generator on the photons' device"
            )
        stats = dict(photons=len(photons), outside=0, steps=0, rounds=0, truncated=0, lost=0)
        fused = self._fused_kernel(dev, detector, record_wall, use_pmts)
        cath_parts: list[CathodeHits] = []
        wall_parts: list[WallHits] = []
        for start in range(0, len(photons), chunk):
            part = photons.select(slice(start, start + chunk))
            pol = None if polarization is None else polarization[start : start + chunk]
            if fused is not None:  # (the kernel drops and counts the photons outside the detector itself)
                hits = self._sample_fused(fused, part, pol, detector, medium, generator, max_rounds, stats)
                if hits is not None:
                    cath_parts.append(hits)
                    continue
            inside = detector.inside(part.pos)
            if not bool(inside.all()):
                stats["outside"] += int((~inside).sum())
                keep_in = torch.nonzero(inside).squeeze(1)
                part = part.select(keep_in)
                pol = None if pol is None else pol.index_select(0, keep_in)
            state = self.init_state(part, medium, generator, pol)
            rounds = 0
            while len(state) and rounds < max_rounds:
                stats["steps"] += len(state)
                state, cath, wall = self.step(state, detector, medium, generator, record_wall, use_pmts)
                stats["lost"] += self._round_bad
                if cath is not None and len(cath):
                    cath_parts.append(cath)
                if wall is not None and len(wall):
                    wall_parts.append(wall)
                rounds += 1
            stats["rounds"] = max(stats["rounds"], rounds)
            stats["truncated"] += len(state)
        dtype = photons.pos.dtype
        cath = _cat_sorted(CathodeHits, cath_parts, _empty_cathode(dev, dtype))
        stats["cathode_hits"] = len(cath)
        self.last_stats = stats
        if not record_wall:
            return cath
        wall = _cat_sorted(WallHits, wall_parts, _empty_wall(dev, dtype))
        stats["wall_hits"] = len(wall)
        return cath, wall

    def _fused_kernel(self, dev: torch.device, detector: Any, record_wall: bool, use_pmts: bool) -> Any:
        """The :mod:`physics.transport_cpu` module when this run uses the fused CPU kernel, else None."""
        if self.backend == "torch":
            return None
        usable = (
            dev.type == "cpu"
            and not record_wall
            and use_pmts
            and hasattr(detector, "_table")
            and int(detector.n_pmts) > 0
        )
        if self.backend == "numba" and not usable:
            raise ConfigError(
                f"backend: got 'numba' for a run on {dev} with record_wall={record_wall}, "
                f"use_pmts={use_pmts}; allowed: 'numba' only for CPU runs with photocathodes "
                f"(use 'torch' or 'auto')"
            )
        if not usable:
            return None
        try:
            from . import transport_cpu
        except ImportError as err:  # numba missing or broken: the tensor transport is exact too, only slower
            if self.backend == "numba":
                raise ConfigError(
                    f"backend: got 'numba' but numba cannot be imported ({err}); allowed: 'torch' or 'auto'"
                ) from err
            return None
        return transport_cpu

    def _sample_fused(
        self,
        kernel: Any,
        photons: Photons,
        polarization: Tensor | None,
        detector: Any,
        medium: Any,
        generator: torch.Generator,
        max_rounds: int,
        stats: dict[str, int],
    ) -> CathodeHits | None:
        """One chunk through the fused CPU kernel (photons outside the detector are dropped and counted
        there): adds to ``stats`` and returns the chunk's cathode hits (photon order); None (nothing done)
        when the medium cannot be tabulated exactly for the kernel (see transport_cpu.medium_table)."""
        dtype = photons.pos.dtype
        if len(photons) == 0:
            return None
        tab = self._kernel_medium_table(kernel, medium, photons.wavelength)
        if tab is None:
            return None
        if polarization is not None and polarization.shape != photons.dir.shape:
            raise ConfigError(
                f"polarization: got shape {tuple(polarization.shape)}, allowed: "
                f"{tuple(photons.dir.shape)} (one vector per photon) or None"
            )
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        res = kernel.transport(
            photons,
            polarization,
            detector,
            tab,
            wall_reflectivity=float(self.wall_reflectivity.detach()),
            diffuse_fraction=float(self.diffuse_fraction.detach()),
            pmt_reflectivity=float(self.pmt_reflectivity.detach()),
            mie_g=float(getattr(medium, "mie_g", 0.0)),
            max_rounds=max_rounds,
            seed=seed,
            eps=_surface_eps(detector, dtype),
        )
        steps, status = res["steps"], res["status"]
        stats["steps"] += int(steps.sum())
        stats["rounds"] = max(stats["rounds"], int(steps.max()))
        n_status = np.bincount(status.view(np.uint8), minlength=4)
        stats["truncated"] += int(n_status[kernel.TRUNCATED])
        stats["lost"] += int(n_status[kernel.LOST])
        stats["outside"] += int(n_status[kernel.OUTSIDE])
        idx = torch.from_numpy(np.flatnonzero(res["pmt"] >= 0))

        def rows(name: str) -> Tensor:
            return torch.from_numpy(res[name]).index_select(0, idx)

        return CathodeHits(
            pmt=rows("pmt"),
            t=rows("t").to(dtype),
            wavelength=photons.wavelength.index_select(0, idx),
            cos_incidence=rows("cos_incidence").to(dtype),
            event=photons.event.index_select(0, idx),
            indirect=rows("indirect"),
        )

    def _kernel_medium_table(self, kernel: Any, medium: Any, wavelength: Tensor) -> Any:
        """The fused kernel's medium table over the medium's band widened to ``wavelength`` [nm]; the last one
        is reused while the medium's type, tensors (parameters and buffers, e.g. calibrated scales) and the
        band are unchanged (building it costs ~2 ms, per chunk otherwise)."""
        lo = min(float(wavelength.min()), float(medium.wl_min))
        hi = max(float(wavelength.max()), float(medium.wl_max))
        state = medium.state_dict() if isinstance(medium, nn.Module) else None
        key = (
            type(medium),
            lo,
            hi,
            None
            if state is None
            else tuple((k, v.detach().cpu().numpy().tobytes()) for k, v in state.items()),
        )
        if state is not None and self._medium_tab is not None and self._medium_tab[0] == key:
            return self._medium_tab[1]
        tab = kernel.medium_table(medium, lo, hi)
        self._medium_tab = (key, tab)
        return tab

    def forward(
        self,
        photons: Photons,
        detector: Any,
        medium: Any,
        generator: torch.Generator,
        record_wall: bool = False,
    ) -> CathodeHits | tuple[CathodeHits, WallHits]:
        """Alias of :meth:`sample`."""
        return self.sample(photons, detector, medium, generator, record_wall)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _inverse_length(length: Tensor | float, dtype: torch.dtype) -> Tensor:
    """1/L with 1/inf = 0 (process off); L must be > 0."""
    length = torch.as_tensor(length).to(dtype)
    return select(torch.isinf(length), 0.0, 1.0 / length)


def _surface_eps(detector: Any, dtype: torch.dtype) -> float:
    """Inward nudge [m] after a reflection: 16 float ulps at the detector's size (>= 1e-9 m)."""
    size = max(float(detector.radius), 0.5 * float(detector.height or 0.0))
    return max(16.0 * torch.finfo(dtype).eps * size, 1e-9)


def _cat_sorted(cls, parts: list, empty):
    if not parts:
        return empty
    rec = cls.cat(parts) if len(parts) > 1 else parts[0]
    ev = rec.event
    if ev.numel() < 2 or bool((ev[1:] >= ev[:-1]).all()):  # already sorted (e.g. one event): stable no-op
        return rec
    order = torch.sort(ev, stable=True).indices
    return rec.select(order)


def _empty_cathode(dev: torch.device, dtype: torch.dtype) -> CathodeHits:
    e = torch.empty(0, dtype=dtype, device=dev)
    i = torch.empty(0, dtype=torch.long, device=dev)
    return CathodeHits(
        pmt=i,
        t=e,
        wavelength=e,
        cos_incidence=e,
        event=i,
        indirect=torch.empty(0, dtype=torch.bool, device=dev),
    )


def _empty_wall(dev: torch.device, dtype: torch.dtype) -> WallHits:
    e = torch.empty(0, dtype=dtype, device=dev)
    i = torch.empty(0, dtype=torch.long, device=dev)
    v = torch.empty(0, 3, dtype=dtype, device=dev)
    return WallHits(pos=v, dir=v.clone(), t=e, wavelength=e, event=i, n_scatter=i, n_reflect=i.clone())
