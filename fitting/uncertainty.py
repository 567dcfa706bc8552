"""Irreducible (not-in-the-likelihood) uncertainty of a track fit: the muon's multiple scattering (MS).

A charged track scatters many times on its way (Highland / Lynch-Dahl; PDG Review of Particle Physics,
"Passage of particles through matter", §34.3, eq. 34.16), so its light comes from a wandering line. The
straight-track likelihood can only find the light-weighted *mean* line, while the truth of a closure test
(and of physics) is the *initial* vertex and direction. The difference is a fluctuation of the event itself,
absent from the likelihood's Hessian. This module computes its covariance from physics (nothing fitted):

* Kinks. A kink at path length s' deflects the track by dtheta in each transverse axis, with variance
  v(s') per cell = (13.6 MeV / (beta c p))^2 [h(s'+ds/2) - h(s'-ds/2)], h(x) = (x/X0) (1 + 0.038 ln(x /
  (X0 beta^2)))^2 -- the increment of Highland's theta0^2 along the accumulated path, the convention of
  :func:`physics.emission.track_steps` (so that the total deflection follows Highland for the whole path).
  The transverse offset and direction of the track at s > s' change by ((s - s') dtheta, dtheta).
* What the fit sees. A photon emitted at s along unit k, travelling D to the wall, lands displaced in the
  plane transverse to k by r = P_k dx + D dk, where dx is the track's transverse offset at s and
  dk = dd (d.k) - d (dd.k) the rotation of k by the track's direction change dd (first order). The straight
  fit (vertex offset a, angle b: offset a + b s, direction b) is taken as the photon-weighted least-squares
  fit of these image displacements, i.e. with per-cell metric W(s) = < Phi^T Phi >_azimuth (4x4 over the
  transverse (offset_1, offset_2, angle_1, angle_2)), Phi = [P_k u1, P_k u2, D dk(u1), D dk(u2)]. With D = 0
  this is the straight-line fit of the displacement d(t) = int_0^t (t - s) dtheta(s) with weight rho(t).
* Propagation. p = (a1, a2, b1, b2) = N^-1 sum_i w_i J_i^T W_i q_i with q_i the true transverse (offset,
  angle) at cell i, J_i = [[I, s_i I], [0, I]], N = sum_i w_i J_i^T W_i J_i and w_i the Cherenkov photons of
  cell i (Frank-Tamm). A kink at cell k along axis m gives the influence g_k^m = N^-1 sum_{i>k} w_i J_i^T W_i
  ((s_i - s_k) E_m + F_m) (E_m, F_m the offset / angle unit vectors), and Cov(p) = sum_k v_k sum_m g g^T
  (independent kinks, both axes). Reverse cumulative sums make it O(E K).

Not modelled: delta rays, the MS shortening of the projected track (second order, ~<theta^2>/2), and the
timing information's own view of the bend.

Status (measured, 500 MeV muons in WCTE, direct light; benchmarks/ms_fit_study.py, ms_kink_probe.py,
ms_fit_response.py): the quadrature above reproduces the least-squares fit of sampled scattered tracks
exactly (tests/test_uncertainty.py), but the likelihood fit does NOT respond to a kink as this least-squares
picture says: it translates the vertex towards the bend and keeps the direction nearly fixed, so the
straight-line model over-estimates the direction uncertainty ~2.5x (direction pulls ~0.4). The
reconstruction therefore reports :func:`kink_response_covariance` instead: the same Highland kinks pushed
through the likelihood fit's own linear response (pulls x 0.89, y 1.20, z 0.89, direction 0.95 / 0.83 on
48 events). The straight-line model (:func:`track_ms_covariance`) remains for those studies only; the
resolution table's multiple-scattering bound is :func:`fitting.fisher.hybrid_fisher`.
Units: m, rad, MeV.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from physics import emission
from physics import expected as px
from physics.config import ConfigError, check_choice, check_number
from physics.constants import PARTICLE_MASS, TRACK_PARTICLES

__all__ = [
    "highland_kink_variance",
    "image_metric",
    "line_fit_kink_covariance",
    "track_fit_weights",
    "track_ms_covariance",
    "cartesian_to_local",
    "kink_response_covariance",
    "kink_modes",
    "kink_mode_offsets",
    "tangent_basis",
]

#: Highland's logarithmic coefficient (PDG eq. 34.16)
HIGHLAND_LOG = 0.038
HIGHLAND_MEV = 13.6


def tangent_basis(d: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors e1, e2 (N,3) orthogonal to unit d (N,3) and to each other: e1 = d x x-hat unless d
    is within 26 deg of x-hat, then d x y-hat; e2 = d x e1. The one convention of the fitting package (the
    local direction coordinates of fitting.reconstruct and fitting.fisher)."""
    helper = torch.zeros_like(d)
    use_x = d[:, 0].abs() < 0.9
    helper[use_x, 0] = 1.0
    helper[~use_x, 1] = 1.0
    u1 = torch.linalg.cross(d, helper)
    u1 = u1 / u1.norm(dim=-1, keepdim=True)
    return u1, torch.linalg.cross(d, u1)


def highland_kink_variance(s_lo: Tensor, s_hi: Tensor, kinetic: Tensor, mass: float, x0: float) -> Tensor:
    """Projected (one transverse axis) scattering-angle variance [rad^2] accumulated between path lengths
    s_lo and s_hi [m] (any shape) at kinetic energy ``kinetic`` [MeV] (same shape), radiation length x0 [m].

    v = (13.6 MeV / (beta c p))^2 [h(s_hi) - h(s_lo)], h(x) = r (1 + 0.038 ln(r / beta^2))_+^2, r = x / X0
    (Highland, PDG eq. 34.16; increments of theta0^2 along the accumulated path as in
    physics.emission.track_steps)."""
    e = kinetic + mass
    p2 = (kinetic * (kinetic + 2.0 * mass)).clamp_min(1e-12)
    beta2 = p2 / (e * e)
    beta_p = p2 / e

    def h(x: Tensor) -> Tensor:
        r = (x / x0).clamp_min(1e-12)
        return r * (1.0 + HIGHLAND_LOG * torch.log(r / beta2)).clamp_min(0.0) ** 2

    return (HIGHLAND_MEV / beta_p) ** 2 * (h(s_hi) - h(s_lo)).clamp_min(0.0)


def image_metric(
    d: Tensor, cos_c: Tensor, dist: Tensor, u1: Tensor, u2: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Per-photon least-squares metric Phi^T Phi (..., 4, 4) over (offset_1, offset_2, angle_1, angle_2).

    d, u1, u2 (..., 3) track direction and transverse basis; cos_c (...) cos of the Cherenkov angle;
    dist (..., F) photon path to the wall [m] at F azimuths (uniform); weight (..., F) optional per-photon
    weight (e.g. 1 / image variance); returns the (weighted) mean over the azimuths.
    Phi (3x4) = [P_k u1, P_k u2, D dk(u1), D dk(u2)], P_k = I - k k^T, dk(u) = u (d.k) - d (u.k)."""
    n_phi = dist.shape[-1]
    phi = torch.arange(n_phi, dtype=d.dtype, device=d.device) * (2.0 * math.pi / n_phi)
    sin_c = torch.sqrt((1.0 - cos_c * cos_c).clamp_min(0.0))
    c, s = sin_c[..., None] * torch.cos(phi), sin_c[..., None] * torch.sin(phi)  # (..., F)
    k = (
        cos_c[..., None, None] * d[..., None, :]
        + c[..., None] * u1[..., None, :]
        + s[..., None] * u2[..., None, :]
    )
    cols = []
    for u in (u1, u2):
        uk = (u[..., None, :] * k).sum(-1, keepdim=True)  # (..., F, 1)
        cols.append(u[..., None, :] - uk * k)
    for u, uk_comp in ((u1, c), (u2, s)):
        dk = u[..., None, :] * cos_c[..., None, None] - d[..., None, :] * uk_comp[..., None]
        cols.append(dist[..., None] * dk)
    phi_m = torch.stack(cols, -1)  # (..., F, 3, 4)
    m = phi_m.transpose(-1, -2) @ phi_m
    if weight is not None:
        m = m * weight[..., None, None]
    return m.mean(-3)


def line_fit_kink_covariance(s: Tensor, w: Tensor, metric: Tensor, kink_var: Tensor) -> Tensor:
    """Covariance (E,4,4) of the weighted straight-line fit p = (a1, a2, b1, b2) [m, m, rad, rad] of a track
    with independent kinks.

    s (E,K) [m] cell centres (ascending), w (E,K) photon weights (>= 0), metric (E,K,4,4) per-photon metric
    over the transverse (offset_1, offset_2, angle_1, angle_2), kink_var (E,K) [rad^2] per-axis variance of
    the kink at s_k (acting on cells i > k). See the module docstring for the formulas."""
    e, k = s.shape
    eye2 = torch.eye(2, dtype=s.dtype, device=s.device)
    jac = torch.zeros(e, k, 4, 4, dtype=s.dtype, device=s.device)
    jac[..., :2, :2] = eye2
    jac[..., 2:, 2:] = eye2
    jac[..., 0, 2] = s
    jac[..., 1, 3] = s
    a = w[..., None, None] * (jac.transpose(-1, -2) @ metric)  # (E,K,4,4) = w J^T W
    n_mat = (a @ jac).sum(1)  # (E,4,4)
    # sum over i > k (exclusive reverse cumulative sums)

    def rev_excl(x: Tensor) -> Tensor:
        return x.flip(1).cumsum(1).flip(1) - x

    cov = torch.zeros(e, 4, 4, dtype=s.dtype, device=s.device)
    for m in range(2):
        y_s = a[..., :, m] * s[..., None] + a[..., :, 2 + m]  # A (s E_m + F_m)  (E,K,4)
        y_0 = a[..., :, m]  # A E_m
        rhs = rev_excl(y_s) - s[..., None] * rev_excl(y_0)  # (E,K,4)
        g = torch.linalg.solve(n_mat[:, None], rhs[..., None])[..., 0]  # (E,K,4)
        cov = cov + (kink_var[..., None, None] * g[..., :, None] * g[..., None, :]).sum(1)
    return 0.5 * (cov + cov.transpose(-1, -2))


def _wall_normal_cos(hit: Tensor, k: Tensor, wall: tuple[str, float, float | None]) -> Tensor:
    """|cos| of the incidence angle of rays k (...,3) hitting the wall at ``hit`` (...,3)."""
    shape, radius, height = wall
    if shape == "sphere":
        nrm = hit / hit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        rad = torch.cat([hit[..., :2], torch.zeros_like(hit[..., 2:])], -1) / radius
        cap = torch.zeros_like(hit)
        cap[..., 2] = torch.sign(hit[..., 2])
        on_cap = hit[..., 2].abs() >= 0.5 * float(height) - 1e-6
        nrm = torch.where(on_cap[..., None], cap, rad)
    return (nrm * k).sum(-1).abs().clamp(0.0, 1.0)


def track_fit_weights(
    vertex: Tensor,
    direction: Tensor,
    energy: Tensor,
    *,
    particle: str,
    medium: Any,
    wall: tuple[str, float, float | None] | None,
    n_nodes: int = 96,
    n_azimuth: int = 16,
    weighting: str = "likelihood",
    pmt_radius: float = 0.0,
    detection: Any = None,
    min_sigma: float = 1e-3,
) -> dict[str, Tensor]:
    """Cells of the expected straight track and the straight-line fit's weights (all float64, no grad).

    Returns dict: s, ds (E,K) [m] cell centres / widths (physics.expected.muon_track_nodes, uniform in
    kinetic energy), kin (E,K) [MeV], w (E,K) Cherenkov photons per cell (Frank-Tamm, truncated at the wall),
    metric (E,K,4,4) per-photon least-squares metric over (offset_1, offset_2, angle_1, angle_2),
    kink_var (E,K) [rad^2] (:func:`highland_kink_variance` over the cell), u1, u2 (E,3) transverse basis.

    weighting:
    * 'likelihood' (default): what the straight-track likelihood does. Its expected ring (physics.expected)
      blurs each cell's light by an angular variance sigma^2(s, D) = Var(phi) + 2 Cov(u, phi) lam + Var(u)
      lam^2 + a^2 (1 + cos^2 inc) / (8 D^2) + Var(theta_c) + min_sigma^2 (lam = cos theta_c / D; the MS
      Fermi-Eyges moments of physics.expected.fermi_eyges_moments, photocathode of radius
      ``pmt_radius`` a, chromatic spread with the ``detection(wl)``-weighted Frank-Tamm spectrum), so the fit
      is the generalised least-squares fit of the photons' angular displacements Phi q / D with weights
      1 / sigma^2: metric = < Phi^T Phi / (D^2 sigma^2) >_azimuth (needs ``wall``);
    * 'positional': the photon-weighted straight-line fit of the transverse displacement d(t) (metric =
      diag(1, 1, 0, 0)), the simplest picture (PDG §34.3 lever-arm fit)."""
    if particle not in TRACK_PARTICLES:
        raise ConfigError(f"particle: got {particle!r}, allowed: {list(TRACK_PARTICLES)}")
    check_number(n_nodes, "n_nodes", minimum=2, integer=True)
    check_number(n_azimuth, "n_azimuth", minimum=3, integer=True)
    check_choice(weighting, "weighting", ("likelihood", "positional"))
    if weighting == "likelihood" and wall is None:
        raise ConfigError("wall: None, but weighting='likelihood' needs the detector wall (shape, r, h)")
    with torch.no_grad():
        v = vertex.detach().to(torch.float64)
        d = direction.detach().to(torch.float64)
        d = d / d.norm(dim=-1, keepdim=True)
        t = energy.detach().to(torch.float64)
        mass = PARTICLE_MASS[particle]
        spin_half = particle.startswith("mu")

        def dedx(kin: Tensor) -> Tensor:
            return emission.bethe_dedx(kin, mass, medium, spin_half=spin_half)

        x0 = float(medium.radiation_length)
        nodes = px.muon_track_nodes(t, mass, float(medium.n_max), n_nodes, dedx, x0)
        s, ds, beta = nodes["s"], nodes["ds"], nodes["beta"]
        kin = mass * (1.0 / torch.sqrt((1.0 - beta * beta).clamp_min(1e-12)) - 1.0)
        w = emission.frank_tamm_yield(beta, medium) * ds
        if wall is not None:  # cells beyond the wall do not radiate (as in physics.expected.direct_light)
            exit_d = px.wall_exit_distance(v, d, wall[0], wall[1], wall[2])
            w = w * ((exit_d[:, None] - (s - 0.5 * ds)) / ds.clamp_min(1e-30)).clamp(0.0, 1.0)
        path = nodes["path"]
        kv = highland_kink_variance(path - 0.5 * ds, path + 0.5 * ds, kin, mass, x0)
        u1, u2 = tangent_basis(d)
        e, k = s.shape
        if weighting == "likelihood":
            # spectrum seen by the sensors: Frank-Tamm 1/lambda^2 times the detection weight
            wl = torch.linspace(medium.wl_min, medium.wl_max, 129, dtype=torch.float64, device=v.device)
            spec = 1.0 / wl**2
            if detection is not None:
                spec = spec * detection(wl).to(torch.float64)
            n_wl = medium.refractive_index(wl).to(torch.float64)
            n_eff = float(torch.rsqrt((spec / n_wl**2).sum() / spec.sum()))
            n_mean = float((spec * n_wl).sum() / spec.sum())
            var_n = float((spec * (n_wl - n_mean) ** 2).sum() / spec.sum())
            cos_c = (1.0 / (beta * n_eff)).clamp(max=1.0)  # (E,K)
            sin2_c = (1.0 - cos_c * cos_c).clamp_min(0.0)
            var_th = cos_c**2 * var_n / (n_mean**2 * (sin2_c + 1e-4))  # delta method, as physics.expected
            sin_c = torch.sqrt(sin2_c)
            phi = torch.arange(n_azimuth, dtype=torch.float64, device=v.device) * (2.0 * math.pi / n_azimuth)
            kdir = (
                cos_c[..., None, None] * d[:, None, None, :]
                + (sin_c[..., None] * torch.cos(phi))[..., None] * u1[:, None, None, :]
                + (sin_c[..., None] * torch.sin(phi))[..., None] * u2[:, None, None, :]
            )  # (E,K,F,3)
            pos = (v[:, None, :] + s[..., None] * d[:, None, :])[:, :, None, :].expand_as(kdir)
            dist = px.wall_exit_distance(pos.reshape(-1, 3), kdir.reshape(-1, 3), wall[0], wall[1], wall[2])
            dist = dist.reshape(e, k, n_azimuth)
            dist = torch.where(torch.isfinite(dist), dist, torch.zeros_like(dist)).clamp_min(1e-3)
            cos_inc = _wall_normal_cos(pos + dist[..., None] * kdir, kdir, wall)
            lam = cos_c[..., None] / dist
            ms = nodes["ms"][..., None, :]
            sig2 = (
                ms[..., 0]
                + 2.0 * ms[..., 1] * lam
                + ms[..., 2] * lam * lam
                + pmt_radius**2 * (1.0 + cos_inc**2) / (8.0 * dist**2)
                + var_th[..., None]
                + min_sigma**2
            )  # (E,K,F) [rad^2]
            metric = image_metric(
                d[:, None, :].expand(e, k, 3),
                cos_c,
                dist,
                u1[:, None, :].expand(e, k, 3),
                u2[:, None, :].expand(e, k, 3),
                weight=1.0 / (dist**2 * sig2),
            )
        else:
            metric = torch.zeros(e, k, 4, 4, dtype=torch.float64, device=v.device)
            metric[..., 0, 0] = 1.0
            metric[..., 1, 1] = 1.0
    return {"s": s, "ds": ds, "kin": kin, "w": w, "metric": metric, "kink_var": kv, "u1": u1, "u2": u2}


def track_ms_covariance(
    vertex: Tensor,
    direction: Tensor,
    energy: Tensor,
    **kwargs: Any,
) -> Tensor:
    """Multiple-scattering covariance (E,8,8) of a straight-track fit, in Cartesian coordinates
    (vertex x, y, z [m], change of the unit direction dx, dy, dz [rad], log E, t0 [ns]).

    vertex (E,3) [m], direction (E,3) (normalised here), energy (E,) kinetic [MeV]; keyword arguments as
    :func:`track_fit_weights` (particle, medium, wall, n_nodes, n_azimuth, weighting, pmt_radius, detection).
    The vertex block is transverse to the direction (longitudinal untouched); the log E and t0 rows are zero.
    Computed in float64 on the input's device, returned in the input's dtype; no gradient. Events with no
    radiating cell give zeros."""
    out_dtype = vertex.dtype
    with torch.no_grad():
        f = track_fit_weights(vertex, direction, energy, **kwargs)
        w, u1, u2 = f["w"], f["u1"], f["u2"]
        e = w.shape[0]
        lit = (w > 0).sum(1) >= 2
        w_safe = torch.where(lit[:, None], w, torch.ones_like(w))
        cov4 = line_fit_kink_covariance(f["s"], w_safe, f["metric"], f["kink_var"])
        cov4 = torch.where(lit[:, None, None] & torch.isfinite(cov4), cov4, torch.zeros_like(cov4))
        tmat = torch.zeros(e, 8, 4, dtype=torch.float64, device=w.device)
        tmat[:, 0:3, 0] = u1
        tmat[:, 0:3, 1] = u2
        tmat[:, 3:6, 2] = u1
        tmat[:, 3:6, 3] = u2
        cov8 = tmat @ cov4 @ tmat.transpose(1, 2)
    return cov8.to(out_dtype)


def cartesian_to_local(cov8: Tensor, e1: Tensor, e2: Tensor) -> Tensor:
    """Map a Cartesian covariance (E,8,8) over (vertex xyz, direction change xyz, log E, t0) to the fit's
    local coordinates (E,7,7): (vertex xyz [m], angles a, b along the tangent basis e1, e2 (E,3) [rad],
    log E, t0 [ns]); a = e1 . dd, b = e2 . dd."""
    e = cov8.shape[0]
    t = torch.zeros(e, 7, 8, dtype=cov8.dtype, device=cov8.device)
    t[:, 0, 0] = t[:, 1, 1] = t[:, 2, 2] = 1.0
    t[:, 3, 3:6] = e1.to(cov8)
    t[:, 4, 3:6] = e2.to(cov8)
    t[:, 5, 6] = 1.0
    t[:, 6, 7] = 1.0
    return t @ cov8 @ t.transpose(1, 2)


def sampled_track_fit(
    steps: Any, vertex: Tensor, direction: Tensor, energy: Tensor, **kwargs: Any
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The straight-line fit of :func:`track_fit_weights` applied to sampled (scattered) tracks.

    steps: physics.records.TrackSteps of E events (e.g. physics.emission.track_steps with multiple
    scattering), started at vertex (E,3) [m] along unit direction (E,3) with kinetic energy (E,) [MeV].
    Each step contributes at its midpoint: longitudinal position s = (x_mid - v).d, true transverse
    q = ((x_mid - v).u1, (x_mid - v).u2, k.u1, k.u2) (k the step direction), weight = its mean photon number,
    metric = the mean-track metric interpolated at s. Returns p (E,4) = (a1, a2, b1, b2) [m, m, rad, rad]
    (vertex offset and angle of the fitted line along u1, u2) and the basis (u1, u2) (E,3) each.
    A direct, Monte-Carlo estimate of what :func:`line_fit_kink_covariance` computes by quadrature."""
    f = track_fit_weights(vertex, direction, energy, **kwargs)
    v = vertex.detach().to(torch.float64)
    d = direction.detach().to(torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    u1, u2 = f["u1"], f["u2"]
    ev = steps.event
    x0, x1 = steps.x0.to(torch.float64), steps.x1.to(torch.float64)
    mid = 0.5 * (x0 + x1) - v[ev]
    seg = x1 - x0
    kdir = seg / seg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    s = (mid * d[ev]).sum(-1)
    q = torch.stack(
        [(mid * u1[ev]).sum(-1), (mid * u2[ev]).sum(-1), (kdir * u1[ev]).sum(-1), (kdir * u2[ev]).sum(-1)], -1
    )
    # metric at s: linear interpolation in the mean track's cell centres (clamped at the ends)
    sk = f["s"]  # (E,K)
    j = torch.searchsorted(sk[ev], s[:, None]).clamp(1, sk.shape[1] - 1)[:, 0]
    s_lo, s_hi = sk[ev, j - 1], sk[ev, j]
    a = ((s - s_lo) / (s_hi - s_lo).clamp_min(1e-30)).clamp(0.0, 1.0)
    met = f["metric"][ev, j - 1] * (1 - a)[:, None, None] + f["metric"][ev, j] * a[:, None, None]
    jac = torch.zeros(s.shape[0], 4, 4, dtype=torch.float64, device=s.device)
    jac[:, 0, 0] = jac[:, 1, 1] = jac[:, 2, 2] = jac[:, 3, 3] = 1.0
    jac[:, 0, 2] = s
    jac[:, 1, 3] = s
    wt = steps.n_photons.to(torch.float64)[:, None, None] * (jac.transpose(1, 2) @ met)  # (N,4,4)
    n_ev = v.shape[0]
    n_mat = torch.zeros(n_ev, 4, 4, dtype=torch.float64, device=s.device).index_add_(0, ev, wt @ jac)
    rhs = torch.zeros(n_ev, 4, dtype=torch.float64, device=s.device)
    rhs = rhs.index_add_(0, ev, (wt @ q[..., None])[..., 0])
    p = torch.linalg.solve(n_mat, rhs[..., None])[..., 0]
    return p, (u1, u2)


def kink_response_covariance(
    hinv: Tensor,
    mixed: Tensor,
    s: Tensor,
    kink_var: Tensor,
    e1: Tensor,
    e2: Tensor,
    fitted_modes: Tensor | None = None,
) -> Tensor:
    """Covariance (E,7,7) of a straight-track fit from the track's multiple-scattering kinks, through the
    fit's own linear response (first-order perturbation of the estimator, e.g. James, Statistical Methods in
    Experimental Physics, 2006, sec. 7.2; the influence of a nuisance shift on a maximum-likelihood fit).

    A kink kappa at track cell k (centre s_k) along transverse axis u turns the track after it by kappa u and
    moves node j > k by kappa (s_j - s_k) u (node k itself: half the turn). The fit's minimum then moves by
    dtheta = H^-1 B_k kappa, B_k = d^2 NLL / dtheta dkappa_k, assembled from the per-node mixed derivatives
    ``mixed`` = d^2 NLL / dtheta d(node offset) (E,7,K,6) [node displacement (3), direction change (3)] by
    reverse cumulative sums. Independent kinks, both axes u = e1, e2 (the fit's tangent basis (E,3)):
    Cov = sum_k kink_var_k sum_u A_k^u A_k^uT, A = H^-1 B; hinv (E,7,7) = H^-1, s (E,K) [m], kink_var (E,K)
    [rad^2] per axis (Highland, :func:`highland_kink_variance`). For a fit of n >= 7 coordinates (the 7
    event ones first) hinv is (E,n,n) and mixed (E,n,K,6). fitted_modes (E,K,M): kinks whose M modes the fit
    itself fits (a bent-track fit; the right singular vectors ``basis`` of :func:`kink_modes`, in the kinks'
    standard-normal coordinates z, kappa_k = sqrt(kink_var_k) z_k): only the rest, (I - U U^T) z, perturbs
    it, Cov = sum_u A (I - U U^T) A^T with A_k = H^-1 B_k sqrt(kink_var_k).

    Only the vertex and direction block (local rows 0-4) is kept. Measured on 48 contained 500 MeV muons in
    WCTE (benchmarks/ms_fit_response.py): the same response applied to each event's own sampled track
    predicts the fitted vertex and direction residuals with correlation 0.86 / 0.92 (x, y) and 0.81 / 0.65
    (the two angles), but the log E residual not at all (correlation -0.13 on 96 events with the
    track-node map of ``muon_track_nodes``: predicted spread 1.0 %, about the measured excess over H^-1, but
    anti-correlated), so the log E and t0 rows are left to H^-1. The longitudinal shortening of the bent
    track (8.9 mm at its end on average) predicts only 0.13 % in log E (correlation +0.18); the energy
    response to the kinks near the stopping end (12 deg rms there) is not linear.
    """
    dt = torch.float64
    hinv, mixed, s, kink_var = hinv.to(dt), mixed.to(dt), s.to(dt), kink_var.to(dt)

    def after(x: Tensor) -> Tensor:  # sum over nodes j > k, (E,7,K)
        return torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1]) - x

    cov = torch.zeros_like(hinv)
    for u in (e1.to(dt), e2.to(dt)):
        g_turn = (mixed[..., 3:] * u[:, None, None, :]).sum(-1)  # (E,7,K)
        g_move = (mixed[..., :3] * u[:, None, None, :]).sum(-1)
        sk = s[:, None, :]
        b = 0.5 * g_turn + after(g_turn) + after(g_move * sk) - sk * after(g_move)
        a = (hinv @ b) * kink_var.clamp_min(0.0).sqrt()[:, None, :]  # (E,n,K)
        if fitted_modes is not None:
            um = fitted_modes.to(dt)
            a = a - (a @ um) @ um.transpose(1, 2)
        cov = cov + a @ a.transpose(1, 2)
    keep = torch.zeros(hinv.shape[-1], dtype=dt, device=cov.device)
    keep[:5] = 1.0
    return cov * keep[:, None] * keep[None, :]


def kink_modes(s: Tensor, kink_var: Tensor, m: int) -> dict[str, Tensor]:
    """The M leading multiple-scattering kink modes of each track and the moments of the rest.

    The kinks of the K track cells are kappa_k = sqrt(v_k) z_k per transverse axis, z ~ N(0, I), v_k =
    kink_var (E,K) [rad^2] (Highland, :func:`highland_kink_variance`); node j at s_j (E,K) [m] turns by
    (T z)_j = sum_{k<j} kappa_k + kappa_j / 2 and moves by (D z)_j = sum_{k<j} kappa_k (s_j - s_k) (as in
    :func:`kink_response_covariance`). The modes are the M leading right singular vectors U (K,M) of T, so
    that z = U a + U_perp b keeps the largest share of the turn variance in a ~ N(0, I) (the discrete
    Karhunen-Loeve expansion of the Brownian tilt; Ghanem & Spanos, Stochastic Finite Elements, 1991, ch. 2).
    The rest, U_perp b, is independent of a; its per-node moments per axis are those of T, D with U U^T
    removed: Var(phi) = diag(T T^T - T U U^T T^T), Cov(u, phi) = diag(T D^T - T U U^T D^T),
    Var(u) = diag(D D^T - D U U^T D^T), the ``node_ms`` that smears a bent track's sharp rings
    (physics.expected.direct_light_folded). With m = 0 they are the discrete form of the straight track's
    Fermi-Eyges moments (physics.expected.fermi_eyges_moments).

    Returns float64 dict: turn (E,K,M) [rad] and disp (E,K,M) [m], the nodes' turn and displacement per unit
    mode amplitude; rest (E,K,3) the moments of the remaining kinks; share (E,K) the fraction of each
    node's turn variance that the M modes carry; basis (E,K,M) the modes U in z. Raises ConfigError for m
    outside 0..K."""
    dt = torch.float64
    s, v = s.to(dt), kink_var.to(dt)
    k = s.shape[1]
    if not 0 <= int(m) <= k:
        raise ConfigError(f"kink modes m: got {m}, allowed: 0 to the number of track nodes ({k})")
    idx = torch.arange(k, device=s.device)
    before = (idx[None, :] < idx[:, None]).to(dt)  # [j, k] = 1 for k < j
    sd = v.clamp_min(0.0).sqrt()[:, None, :]
    turn = (before + 0.5 * torch.eye(k, dtype=dt, device=s.device)) * sd  # (E,K,K)
    disp = before * (s[:, :, None] - s[:, None, :]) * sd
    u = torch.linalg.svd(turn)[2].transpose(1, 2)[:, :, : int(m)]  # (E,K,M)
    tm, dm = turn @ u, disp @ u

    def diag_rest(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor) -> Tensor:
        return (x * y).sum(-1) - (xm * ym).sum(-1)

    rest = torch.stack(
        [diag_rest(turn, turn, tm, tm), diag_rest(turn, disp, tm, dm), diag_rest(disp, disp, dm, dm)], -1
    )
    share = (tm * tm).sum(-1) / (turn * turn).sum(-1).clamp_min(1e-300)
    return {"turn": tm, "disp": dm, "rest": rest, "share": share, "basis": u}


def kink_mode_offsets(amp: Tensor, turn: Tensor, disp: Tensor, e1: Tensor, e2: Tensor) -> Tensor:
    """Node offsets (E,K,6) (displacement [m], direction change [rad]; ``node_offset`` of
    fitting.response.PhysicsResponse) of kink-mode amplitudes amp (E,2M): the first M along the transverse
    axis e1 (E,3), the rest along e2; turn, disp (E,K,M) from :func:`kink_modes`."""
    m = turn.shape[2]
    a1, a2 = amp[:, :m, None], amp[:, m:, None]
    dd = (turn @ a1) * e1[:, None] + (turn @ a2) * e2[:, None]
    dx = (disp @ a1) * e1[:, None] + (disp @ a2) * e2[:, None]
    return torch.cat([dx, dd], -1)
