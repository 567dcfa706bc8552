"""Fast seeds for reconstruction from hits alone: vertex + t0, direction, energy (batched over events).

Units: m, ns, MeV (kinetic), p.e. Shapes: E events x P PMTs (dense hit arrays from
:func:`fitting.likelihood.hits_to_dense`).

* Vertex and t0 -- point-source time-residual fit (the classic water-Cherenkov pre-fit, e.g. Super-K's
  "BONSAI"/fiTQun pre-fitter idea; Smy, Proc. ICRC 2007, and Jiang et al., PRD 99 (2019) 092005 sec. IV.A):
  minimise sum_i w_i rho(r_i / s), r_i = t_i - t0 - |x_i - v| n_g / c, w_i the hit charge, with the
  asymmetric robust loss :func:`time_loss`: soft-L1 sqrt(1 + z^2) - 1 for early residuals (only the TTS
  puts direct light early) and Cauchy ln(1 + z^2) / 2 for late ones, whose pull falls off as 1/z: the
  scattered, reflected and dark light makes a long late tail of the residual distribution (the shape
  BONSAI's time likelihood has, Smy 2007), and with the soft-L1 loss on both sides the 10 % of the light
  that is indirect dragged 14 % of the 500 MeV WCTE muon seeds out of the tank (33 of 240). t0 is
  profiled analytically at each step by a weighted median start and Adam on (v, t0).
  For a track the fitted "point" lies on the track near its light-weighted middle.
* Track time fit -- then (v, d, t0) are refitted with the track hypothesis: a photon reaching PMT x left
  the track at the Cherenkov emission point s* = p - r cot(theta_c) (p = (x - v).d, r the distance of x
  from the track line), clamped to [0, L] (L ~ T / (230 MeV/m), the muon CSDA range slope in water), and
  arrives at t0 + s*/c + |x - v - s* d| n_g / c (fiTQun's pre-fit track-time residual, Jiang et al. 2019).
* Direction -- charge-weighted mean of the unit vectors (x_i - v) / |x_i - v| from the vertex to the hit
  PMTs: for a Cherenkov ring it points along the track axis (the ring is symmetric about it). It seeds the
  track time fit, whose direction is kept unless it has turned more than ``RING_AGREEMENT_DEG`` from the
  ring's axis seen from the fitted vertex; then the ring's axis is taken. The time fit's direction is
  weakly constrained (a short track's emission points nearly coincide), and with scattered and reflected
  light it wanders: on 240 full-optics 500 MeV WCTE muons (bench_pid seeds) the time-fit direction was off
  by up to 102 deg (99 % quantile 33 deg) while the ring's axis from the same vertex was within 10.2 deg of
  the truth for all 240; the two disagreed by > 20 deg in 4 events, in each of which the ring's axis was
  the better (8.4-9.6 deg vs 31-102 deg); for electrons they agree within 6.5 deg. Short tracks: for 48
  isotropic contained 200 MeV muons in WCTE (direct light) the time fit's directions were 32 deg off
  (median; the ring's axis 7 deg), and they disagreed in 29; with the check the median is 9 deg. In SK
  the time fit's direction is off by 10-37 deg (median, 24 events per cell, e and mu at 200-1000 MeV) and
  the check fires in 21-92 % of events (median after it 4-7 deg). Isotropic WCTE events at 500 and 1000 MeV
  and the PID samples' electrons never trip it.
* Energy -- total charge Q against the expected total mu_tot(E) of the response model on a ladder of
  energies (one batched evaluation), inverted by monotone piecewise-linear interpolation (mu_tot is close to
  linear in kinetic energy above threshold for a track -- light yield ~ track length -- and zero below the
  Cherenkov threshold, where a seed would leave the fit without any gradient in energy); beyond the ladder
  the last segment is extended; the seed is clamped to [e_min, e_max].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from physics.config import ConfigError
from physics.constants import C_M_PER_NS

# kinetic energies [MeV] of the energy seed's calibration: rungs below and above the muon Cherenkov threshold
# in water (~54 MeV; showers radiate at all of them), then one segment 300 -> 800 MeV, extended linearly
# beyond: the seed vertex lies mid-track, so from there a multi-GeV rung would leave the detector and its
# saturated charge would extrapolate to absurd energies (tried: 1 GeV muons in WCTE then failed 33 of 40 fits)
ENERGY_LADDER = (20.0, 40.0, 70.0, 120.0, 200.0, 300.0, 800.0)

# largest angle [deg] between the track time fit's direction and the ring's charge-weighted axis at the
# fitted vertex for which the time fit's direction is kept (module doc): in the 480 PID-sample events the
# ring's axis was at most 10.2 deg off; 20 deg separates the time fit's outliers (21-102 deg) from the rest
RING_AGREEMENT_DEG = 20.0

__all__ = [
    "time_loss",
    "time_residual_fit",
    "track_time_fit",
    "charge_direction",
    "energy_from_charge",
    "prefit",
]


def _hit_columns(obs: dict[str, Tensor], pmt_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hit PMTs of each event packed into H = max hits columns (unhit PMTs have zero weight in both time
    fits, so dropping them changes nothing but the cost): hit (E,H) bool, pos (E,3,H) [m] (coordinates
    first: the fits' element-wise steps and their sums over the coordinates run along contiguous rows of H,
    several times faster on CPU than over a trailing axis of 3), weight w = charge + 1e-3 (E,H) (0 in
    padding), time (E,H) [ns], float64."""
    hit = obs["hit"]
    dt = torch.float64
    n_max = max(int(hit.sum(1).max()) if hit.numel() else 0, 1)
    order = torch.sort(hit.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_max]  # (E,H)
    hit_c = hit.gather(1, order)
    q = obs["charge"].to(dt).gather(1, order)
    w = torch.where(hit_c, q.clamp_min(0.0) + 1e-3, torch.zeros((), dtype=dt, device=hit.device))
    pos = pmt_pos.to(device=hit.device, dtype=dt)[order].transpose(1, 2).contiguous()
    return hit_c, pos, w, obs["time"].to(dt).gather(1, order)


def time_loss(z: Tensor) -> Tensor:
    """Robust loss of a scaled time residual z (any shape): sqrt(1 + z^2) - 1 for z < 0, ln(1 + z^2) / 2 for
    z >= 0. Both sides are 0 with slope 0 and curvature 1 at z = 0 (twice differentiable); early residuals
    keep a linear tail, late ones (scattered, reflected, dark light) a logarithmic one."""
    return torch.where(z < 0, torch.sqrt(1.0 + z * z) - 1.0, 0.5 * torch.log1p(z * z))


def time_residual_fit(
    obs: dict[str, Tensor],
    pmt_pos: Tensor,
    *,
    n_group: float = 1.38,
    scale_ns: float = 2.0,
    steps: int = 150,
    lr: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Robust point-source fit of (vertex (E,3) [m], t0 (E,) [ns]) to hit times, batched.

    obs: hit (E,P) bool, charge (E,P), time (E,P) [ns]; pmt_pos (P,3) [m]; n_group: group index of the
    light (photon speed c/n_g); scale_ns: residual scale s of :func:`time_loss`; steps, lr: Adam on (v, t0)
    from v = charge-weighted centroid of the hit PMTs x 0.5 (a point inside, towards the lit side).
    Events without hits get v = 0, t0 = 0.
    """
    hit, pos, w, t = _hit_columns(obs, pmt_pos)
    wsum = w.sum(1, keepdim=True).clamp_min(1e-12)
    inv_v = n_group / C_M_PER_NS
    v = (0.5 * (w[:, None] * pos).sum(2) / wsum).detach().clone()
    with torch.no_grad():
        d0 = (pos - v[..., None]).norm(dim=1)
        r0 = torch.where(hit, t - d0 * inv_v, torch.full_like(t, float("inf")))
        # start t0 at the 20% quantile of the residuals (early direct light), robust to late hits
        srt = torch.sort(r0, 1).values
        n_hit = hit.sum(1)
        k = (0.2 * (n_hit - 1).clamp_min(0)).long()
        t0 = torch.where(n_hit > 0, srt.gather(1, k[:, None])[:, 0], torch.zeros_like(srt[:, 0]))
    v = v.requires_grad_()
    t0 = t0.clone().requires_grad_()
    opt = torch.optim.Adam([{"params": [v], "lr": lr}, {"params": [t0], "lr": lr * 5.0}])
    for _ in range(steps):
        opt.zero_grad()
        d = torch.sqrt(((pos - v[..., None]) ** 2).sum(1) + 1e-12)
        z = (t - t0[:, None] - d * inv_v) / scale_ns
        loss = (w * time_loss(z)).sum(1) / wsum[:, 0]
        loss.sum().backward()
        opt.step()
    return v.detach(), t0.detach()


def track_time_fit(
    obs: dict[str, Tensor],
    pmt_pos: Tensor,
    vertex: Tensor,
    direction: Tensor,
    t0: Tensor,
    track_length: Tensor,
    *,
    n_group: float = 1.38,
    n_phase: float = 1.344,
    scale_ns: float = 1.5,
    steps: int = 200,
    lr: float = 0.03,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust track time-residual fit of (vertex (E,3), direction (E,3), t0 (E,)) (see module docstring).

    track_length (E,) [m] caps the emission point; n_phase sets cos(theta_c) = 1/n (beta = 1). Adam on
    (v, unnormalised d, t0) with :func:`time_loss` weighted by hit charge."""
    dt = torch.float64
    _, pos, w, t = _hit_columns(obs, pmt_pos)
    wsum = w.sum(1).clamp_min(1e-12)
    inv_v = n_group / C_M_PER_NS
    cot_c = 1.0 / (n_phase * (1.0 - 1.0 / n_phase**2) ** 0.5)  # cos/sin
    v = vertex.to(dt).clone().requires_grad_()
    u = direction.to(dt).clone().requires_grad_()
    tt0 = t0.to(dt).clone().requires_grad_()
    big_l = track_length.to(dt)[:, None]
    opt = torch.optim.Adam([{"params": [v, u], "lr": lr}, {"params": [tt0], "lr": lr * 5.0}])
    for _ in range(steps):
        opt.zero_grad()
        d = u / u.norm(dim=-1, keepdim=True)
        q = pos - v[..., None]  # (E,3,H)
        p = (q * d[..., None]).sum(1)
        r = torch.sqrt(((q * q).sum(1) - p * p).clamp_min(1e-9))
        s = torch.minimum(torch.relu(p - r * cot_c), big_l)
        dist = torch.sqrt(((q - s[:, None] * d[..., None]) ** 2).sum(1) + 1e-12)
        z = (t - tt0[:, None] - s / C_M_PER_NS - dist * inv_v) / scale_ns
        loss = (w * time_loss(z)).sum(1) / wsum
        loss.sum().backward()
        opt.step()
    d = (u / u.norm(dim=-1, keepdim=True)).detach()
    return v.detach(), d, tt0.detach()


def charge_direction(obs: dict[str, Tensor], pmt_pos: Tensor, vertex: Tensor) -> Tensor:
    """Charge-weighted mean unit vector from ``vertex`` (E,3) to the hit PMTs -> (E,3) unit direction.

    Events without hits (or a vanishing mean) get +z."""
    hit = obs["hit"]
    dt = vertex.dtype
    w = torch.where(hit, obs["charge"].to(dt).clamp_min(0.0), torch.zeros((), dtype=dt, device=hit.device))
    u = pmt_pos.to(device=vertex.device, dtype=dt)[None] - vertex[:, None]
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    m = (w[..., None] * u).sum(1)
    nrm = m.norm(dim=-1, keepdim=True)
    zhat = torch.zeros_like(m)
    zhat[:, 2] = 1.0
    return torch.where(nrm > 1e-9, m / nrm.clamp_min(1e-12), zhat)


def energy_from_charge(
    total_charge: Tensor,
    response,
    vertex: Tensor,
    direction: Tensor,
    *,
    ladder: tuple[float, ...] = ENERGY_LADDER,
    e_min: float = 20.0,
    e_max: float = 1e5,
) -> Tensor:
    """Energy seed (E,) [MeV] from the total charge (E,) [p.e.]: mu_tot on the energy ``ladder`` [MeV]
    (increasing), inverted piecewise-linearly (module doc).

    The ladder's expectations are computed with ``response`` (a ResponseModel whose event keys are vertex,
    direction, energy) at the seed vertex and direction, so the detector geometry, the track's exit through
    the wall, attenuation and the Cherenkov threshold are included. A charge below the first lit rung (the
    rung before it has mu_tot = 0: the threshold lies between them) gets that rung's energy, so a faint
    track's seed radiates and the fit has a gradient in energy."""
    n = vertex.shape[0]
    dt, f32 = torch.float64, torch.float32
    dev = vertex.device
    lad = torch.tensor(ladder, dtype=dt, device=dev)
    if lad.numel() < 2 or not bool((lad.diff() > 0).all()):
        raise ConfigError(f"ladder: got {ladder!r}; allowed: at least two increasing energies [MeV]")
    k = lad.numel()
    with torch.no_grad():
        mu = response.expected_mu(  # float32 (half the cost of float64; a seed needs no more)
            {
                "vertex": vertex.to(f32).repeat_interleave(k, 0),
                "direction": direction.to(f32).repeat_interleave(k, 0),
                "energy": lad.to(f32).repeat(n),
                "t0": torch.zeros(n * k, dtype=f32, device=dev),
            }
        )
        tot = torch.cummax(mu.to(dt).sum(1).reshape(n, k), 1).values  # (E,K), monotone
        q = total_charge.to(dt).reshape(n, 1)
        j = torch.searchsorted(tot.contiguous(), q, right=True).clamp(1, k - 1)  # segment [j-1, j]
        lo, hi = j - 1, j
        m_lo, m_hi = tot.gather(1, lo), tot.gather(1, hi)
        e_lo, e_hi = lad[lo], lad[hi]
        e = e_lo + (q - m_lo) * (e_hi - e_lo) / (m_hi - m_lo).clamp_min(1e-9)
        # below the first lit rung the threshold lies somewhere in the segment: seed at the lit rung
        e = torch.where(m_lo > 1e-6 * m_hi, e, e_hi)
    return e[:, 0].clamp(e_min, e_max)


def prefit(
    obs: dict[str, Tensor],
    pmt_pos: Tensor,
    response=None,
    *,
    n_group: float = 1.38,
    mu_dark: float = 0.0,
    steps: int = 150,
) -> dict[str, Tensor]:
    """All seeds at once: dict vertex (E,3) [m], direction (E,3), energy (E,) [MeV], t0 (E,) [ns].

    ``response`` (optional) calibrates the energy seed; without it the energy is left at 500 MeV.
    mu_dark: expected dark p.e. per PMT in the window, subtracted from the total charge."""
    if obs["hit"].dim() != 2:
        raise ConfigError(f"obs['hit']: shape {tuple(obs['hit'].shape)}, expected (E,P)")
    v, t0 = time_residual_fit(obs, pmt_pos, n_group=n_group, steps=steps)
    d = charge_direction(obs, pmt_pos, v)
    q = torch.where(obs["hit"], obs["charge"].to(torch.float64), torch.zeros((), dtype=torch.float64)).sum(1)
    q = q - mu_dark * obs["hit"].shape[1]
    e = torch.full_like(q, 500.0)
    if response is not None:
        e = energy_from_charge(q, response, v, d)
    # the point fit sits near the light centroid: start the track fit half a range back along d
    length = (e / 230.0).clamp(0.1, 20.0)
    v, d, t0 = track_time_fit(obs, pmt_pos, v - 0.4 * length[:, None] * d, d, t0, length, n_group=n_group)
    ring = charge_direction(obs, pmt_pos, v)
    turned = (d * ring).sum(-1) < math.cos(math.radians(RING_AGREEMENT_DEG))
    d = torch.where(turned[:, None], ring, d)
    if response is not None:
        e = energy_from_charge(q, response, v, d)
    return {"vertex": v, "direction": d, "energy": e, "t0": t0}
