"""Fused CPU kernel of the Monte-Carlo photon transport (Numba), used by :class:`physics.optics.Optics`.

Same physics, same geometry and the same decisions as the round-by-round torch transport of
:meth:`physics.optics.Optics.step` (see that module's docstring for the processes and their references), but
each photon is followed from birth to death in one compiled loop: no per-round temporaries, no compaction,
float64 throughout. Parallel over photons (``numba.prange``; thread count = ``torch.get_num_threads()``;
Numba's 'workqueue' threading layer unless NUMBA_THREADING_LAYER says otherwise).

Random numbers: every photon owns a SplitMix64 stream (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), seeded by the 64-bit finaliser of (chunk seed + photon index x golden
gamma). The chunk seed is drawn from the caller's ``torch.Generator``, so results are reproducible from the
generator's seed and independent of the thread count. The streams differ from torch's, so the two backends
agree statistically, not photon by photon (tests/test_transport_cpu.py checks that).

PMT look-up: the exact grid of :class:`physics.geometry.Detector` (its candidate table per wall cell, the
same fast-path conditions: the ray's path through the PMT shell lies within ``pad`` of the exit point, with
the start cell added for starts inside the shell; other rays test every PMT). The ray-disk test is
t = (c - p).n / (d.n) for d.n < 0, hit if 0 < t <= t_wall + tol and |p + t d - c| <= r (evaluated without
the division, :func:`_disk`). The look-up is skipped for a step that ends in the volume when its start and
end lie deeper than every disk (the convex inner volume holds the whole segment, so no disk can come first:
the same decision, bit for bit).
Photons starting outside the detector are not transported (status OUTSIDE).

The helpers of the hot path (random numbers, coefficients, wall and PMT look-up) are inlined into the
kernel at Numba-IR level (``inline="always"``): LLVM left them as calls, and inlining made the kernel
1.15-1.3x faster on one core, same outputs bit for bit. The scattering and reflection helpers (taken by
~10 % of the steps) stay calls: inlining them too cost +10 s of compile time for no measurable gain.
First compile ~30 s per input dtype, then read from Numba's on-disk cache.
"""

from __future__ import annotations

import math
import os
import threading
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from numba import config as numba_config
from numba import get_num_threads, njit, prange, set_num_threads

from .constants import C_M_PER_NS

if "NUMBA_THREADING_LAYER" not in os.environ:
    # Numba's own thread pool rather than a second OpenMP runtime beside torch's: with two OpenMP pools the
    # spinning threads of one slowed the other (bench_optics on 2 cores: 5.2-7.3e6 photon-steps/s over
    # three 'omp' runs vs 7.8-7.9e6 with 'workqueue'). Set NUMBA_THREADING_LAYER to choose another layer.
    numba_config.THREADING_LAYER = "workqueue"
# the workqueue layer aborts on concurrent launches: calls from several Python threads take turns
_LAUNCH = threading.Lock()

_TINY = 1e-30
_INV53 = 1.0 / 9007199254740992.0  # 2^-53
# status per photon after transport
DEAD, TRUNCATED, LOST, OUTSIDE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# random numbers: SplitMix64
# --------------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, error_model="numpy", inline="always")
def _uniform(s):
    """Next state and a uniform double in [0, 1) (53 random bits)."""
    s = s + np.uint64(0x9E3779B97F4A7C15)
    return s, float(_mix64(s) >> np.uint64(11)) * _INV53


# --------------------------------------------------------------------------------------------------
# direction kernels (scalar versions of physics.optics' tensor kernels, same formulas)
# --------------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _basis(x, y, z):
    """Duff et al. (JCGT 6, 2017) orthonormal basis of unit (x, y, z), as in optics.orthonormal_basis."""
    sign = 1.0 if z >= 0.0 else -1.0
    k = -1.0 / (sign + z)
    b = x * y * k
    sx = sign * x
    return 1.0 + sx * x * k, sign * b, -sx, b, sign + y * y * k, -y


@njit(cache=True, error_model="numpy")
def _rotate(ax, ay, az, c, phi):
    """Unit vector at polar cosine c and azimuth phi about unit axis a (optics.rotate_direction)."""
    e1x, e1y, e1z, e2x, e2y, e2z = _basis(ax, ay, az)
    s = math.sqrt(max(1.0 - c * c, 0.0))
    sc, ss = s * math.cos(phi), s * math.sin(phi)
    ox = c * ax + sc * e1x + ss * e2x
    oy = c * ay + sc * e1y + ss * e2y
    oz = c * az + sc * e1z + ss * e2z
    n = math.sqrt(ox * ox + oy * oy + oz * oz)
    return ox / n, oy / n, oz / n


@njit(cache=True, error_model="numpy")
def _random_perp(dx, dy, dz, u):
    """Unit vector perpendicular to unit d at azimuth 2 pi u (optics.random_perpendicular)."""
    e1x, e1y, e1z, e2x, e2y, e2z = _basis(dx, dy, dz)
    a = 2.0 * math.pi * u
    c, s = math.cos(a), math.sin(a)
    return c * e1x + s * e2x, c * e1y + s * e2y, c * e1z + s * e2z


@njit(cache=True, error_model="numpy")
def _project(px, py, pz, dx, dy, dz, u):
    """Polarisation p projected perpendicular to d and normalised; random (azimuth 2 pi u) when the
    projection vanishes (optics.project_polarization)."""
    pd = px * dx + py * dy + pz * dz
    qx, qy, qz = px - pd * dx, py - pd * dy, pz - pd * dz
    n = math.sqrt(qx * qx + qy * qy + qz * qz)
    if n > 1e-6:
        return qx / n, qy / n, qz / n
    return _random_perp(dx, dy, dz, u)


@njit(cache=True, error_model="numpy")
def _dipole_cos(u):
    """Inverse CDF of 3/4 (1 - x^2) (optics.dipole_cos_psi)."""
    x = 2.0 * math.cos((math.acos(min(max(1.0 - 2.0 * u, -1.0), 1.0)) - 2.0 * math.pi) / 3.0)
    return min(max(x, -1.0), 1.0)


@njit(cache=True, error_model="numpy")
def _hg_cos(u, g):
    """Henyey-Greenstein inverse CDF (optics.henyey_greenstein_cos_theta)."""
    if abs(g) < 1e-6:
        c = 2.0 * u - 1.0
    else:
        f = (1.0 - g * g) / (1.0 - g + 2.0 * g * u)
        c = (1.0 + g * g - f * f) / (2.0 * g)
    return min(max(c, -1.0), 1.0)


# --------------------------------------------------------------------------------------------------
# geometry (scalar versions of physics.geometry.Detector's ray queries)
# --------------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _exit_root(a, b, c):
    """Largest root of a t^2 + 2 b t + c = 0 (geometry._exit_root); inf if a == 0."""
    if not a > 0.0:
        return math.inf
    sq = math.sqrt(max(b * b - a * c, _TINY))
    if b >= 0.0:
        t = -c / max(b + sq, _TINY)
    else:
        t = (sq - b) / max(a, _TINY)
    return max(t, 0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _wall(px, py, pz, dx, dy, dz, sphere, R, H):
    """Exit distance [m] and surface (0 barrel / sphere, 1 top cap, 2 bottom cap)."""
    if sphere:
        return _exit_root(
            dx * dx + dy * dy + dz * dz, px * dx + py * dy + pz * dz, px * px + py * py + pz * pz - R * R
        ), 0
    tb = _exit_root(dx * dx + dy * dy, px * dx + py * dy, px * px + py * py - R * R)
    if dz != 0.0:
        tc = max((math.copysign(0.5 * H, dz) - pz) / dz, 0.0)
    else:
        tc = math.inf
    if tc < tb:
        return tc, (1 if dz > 0.0 else 2)
    return tb, 0


@njit(cache=True, error_model="numpy")
def _wall_normal(hx, hy, hz, surf, sphere):
    """Inward unit normal at the wall point h on surface ``surf``."""
    if sphere:
        n = max(math.sqrt(hx * hx + hy * hy + hz * hz), _TINY)
        return -hx / n, -hy / n, -hz / n
    if surf == 0:
        n = max(math.sqrt(hx * hx + hy * hy), _TINY)
        return -hx / n, -hy / n, 0.0
    return 0.0, 0.0, (-1.0 if surf == 1 else 1.0)


@njit(cache=True, error_model="numpy", inline="always")
def _in_inner(x, y, z, sphere, R, H, shell):
    """Strictly deeper than the PMT shell depth (geometry.Detector._in_inner)."""
    ri = R - shell
    if sphere:
        return x * x + y * y + z * z < ri * ri
    return (x * x + y * y < ri * ri) and (abs(z) < 0.5 * H - shell)


@njit(cache=True, error_model="numpy", inline="always")
def _ifloor(v, n):
    """floor(v) clamped to [0, n - 1]; NaN -> 0 (as geometry.Detector._cell_index)."""
    if not v == v:
        return 0
    f = math.floor(v)
    if f < 0.0:
        return 0
    if f > n - 1:
        return n - 1
    return int(f)


@njit(cache=True, error_model="numpy", inline="always")
def _atan_approx(z):
    """atan(z) for |z| <= 1 to ~2e-3 rad (z pi/4 + z (1 - |z|)(0.2447 + 0.0663 |z|); Rajan et al., IEEE
    Signal Process. Mag. 23 (2006) 108): a first guess that :func:`_sector` corrects exactly."""
    a = abs(z)
    return 0.25 * math.pi * z + z * (1.0 - a) * (0.2447 + 0.0663 * a)


@njit(cache=True, error_model="numpy", inline="always")
def _sector(guess, n, bnd, y, x):
    """Exact interval k in [0, n-1] of the boundaries bnd[k] (rows (cos, sin) of increasing angles): the
    largest k with bnd[k] x (x, y) >= 0 (cross product: (x, y) at or after boundary k), clamped; starting at
    ``guess``, off by at most one or two intervals."""
    k = min(max(guess, 0), n - 1)
    while k > 0 and bnd[k, 0] * y - bnd[k, 1] * x < 0.0:
        k -= 1
    while k < n - 1 and bnd[k + 1, 0] * y - bnd[k + 1, 1] * x >= 0.0:
        k += 1
    return k


@njit(cache=True, error_model="numpy", inline="always")
def _cell(hx, hy, hz, surf, sphere, R, H, g0, g1, g2, bnd):
    """Wall-cell index of the wall point h (geometry.Detector._cell_index, without atan/atan2: an approximate
    angle corrected against the cells' boundary directions ``bnd``, so the cell is the one the boundaries
    define up to the rounding of a cross product, ~1e-16 rad, far inside the table's tolerance slack).
    g = (n, 0, 0) for a sphere's cube map (bnd rows (cos, sin) of the angles pi/4 (2k/n - 1)), (n_phi, n_z,
    n_c) for a cylinder (bnd rows (cos, sin) of -pi + 2 pi k / n_phi)."""
    if sphere:
        n = g0
        ax, ay, az = abs(hx), abs(hy), abs(hz)
        if ax >= ay and ax >= az:
            axis, major, u, v = 0, hx, hy, hz
        elif ay >= az:
            axis, major, u, v = 1, hy, hx, hz
        else:
            axis, major, u, v = 2, hz, hx, hy
        face = 2 * axis + (1 if major < 0.0 else 0)
        am = max(abs(major), _TINY)
        ia = _sector(_ifloor((4.0 / math.pi * _atan_approx(u / am) + 1.0) * (0.5 * n), n), n, bnd, u, am)
        ib = _sector(_ifloor((4.0 / math.pi * _atan_approx(v / am) + 1.0) * (0.5 * n), n), n, bnd, v, am)
        return (face * n + ia) * n + ib
    n_phi, n_z, n_c = g0, g1, g2
    if surf == 0:
        # atan2(hy, hx) in (-pi, pi] from the octant and _atan_approx
        if abs(hx) >= abs(hy):
            a = _atan_approx(hy / hx) if hx != 0.0 else 0.0
            if hx < 0.0:
                a = a + math.pi if hy >= 0.0 else a - math.pi
        else:
            a = (0.5 * math.pi if hy > 0.0 else -0.5 * math.pi) - _atan_approx(hx / hy)
        ip = _sector(_ifloor((a + math.pi) * (n_phi / (2.0 * math.pi)), n_phi), n_phi, bnd, hy, hx)
        iz = _ifloor((hz + 0.5 * H) * (n_z / H), n_z)
        return ip * n_z + iz
    ix = _ifloor((hx + R) * (n_c / (2.0 * R)), n_c)
    iy = _ifloor((hy + R) * (n_c / (2.0 * R)), n_c)
    return n_phi * n_z + (surf - 1) * n_c * n_c + ix * n_c + iy


@njit(cache=True, error_model="numpy", inline="always")
def _disk(px, py, pz, dx, dy, dz, geom, j, limit, best, best_dn, best_j):
    """Ray-disk test of PMT j (geom rows: cx, cy, cz, nx, ny, nz, r^2); keeps the nearest hit. Division-free:
    with w = p - c, dn = d.n < 0 and num = -(w.n) < 0 (disk in front), the hit distance t = num / dn obeys
    t <= limit <=> num >= limit dn and t < best <=> num > best dn, and |p + t d - c|^2 <= r^2 multiplied by
    dn^2 > 0 reads (w.w dn + 2 num (w.d)) dn + num^2 |d|^2 <= r^2 dn^2 (|d|^2 kept: float32 inputs are unit
    only to ~1e-7). The one division is taken for a hit only. Every condition is evaluated and combined
    (no early exits: the per-candidate tests are coin flips whose mispredictions cost more than the
    arithmetic)."""
    nx, ny, nz = geom[j, 3], geom[j, 4], geom[j, 5]
    wx, wy, wz = px - geom[j, 0], py - geom[j, 1], pz - geom[j, 2]
    dn = dx * nx + dy * ny + dz * nz
    num = -(wx * nx + wy * ny + wz * nz)
    wd = wx * dx + wy * dy + wz * dz
    ww = wx * wx + wy * wy + wz * wz
    q = (ww * dn + 2.0 * num * wd) * dn + num * num * (dx * dx + dy * dy + dz * dz)
    ok = (dn < 0.0) & (num < 0.0) & (num >= limit * dn) & (num > best * dn) & (q <= geom[j, 6] * dn * dn)
    if ok:
        return num / dn, dn, j
    return best, best_dn, best_j


@njit(cache=True, error_model="numpy", inline="always")
def _first_pmt(
    px, py, pz, dx, dy, dz, t_wall, surf, sphere, R, H, shell, pad, tol, g0, g1, g2, bnd, geom, table, counts
):
    """Nearest PMT disk hit before the wall: (t [m] or inf, d.n, PMT index or -1). Fast path: the candidates
    of the exit point's cell, plus those of the cell of the wall point under the start for a start inside
    the shell; otherwise every PMT. One loop over (cell, candidate) pairs, so that :func:`_cell` and
    :func:`_disk` are inlined once each (compile time)."""
    limit = t_wall + tol
    best, best_dn, best_j = math.inf, 0.0, -1
    start_in = _in_inner(px, py, pz, sphere, R, H, shell)
    back = max(t_wall - pad, 0.0)
    fast = _in_inner(px + back * dx, py + back * dy, pz + back * dz, sphere, R, H, shell)
    if not start_in:
        s = pad - shell
        fast = fast and _in_inner(px + s * dx, py + s * dy, pz + s * dz, sphere, R, H, shell)
    if t_wall <= pad:
        fast = True
    n_cells = (1 if start_in else 2) if fast else 1
    for m in range(n_cells):
        if m == 0:  # the exit point
            wx, wy, wz, ws = px + t_wall * dx, py + t_wall * dy, pz + t_wall * dz, surf
        elif sphere:  # the wall point under a start inside the shell
            n = max(math.sqrt(px * px + py * py + pz * pz), _TINY)
            wx, wy, wz, ws = R * px / n, R * py / n, R * pz / n, 0
        else:
            rho = max(math.sqrt(px * px + py * py), _TINY)
            if (R - rho) <= (0.5 * H - abs(pz)):
                wx, wy, wz, ws = R * px / rho, R * py / rho, pz, 0
            else:
                wx, wy = px, py
                wz, ws = (0.5 * H, 1) if pz >= 0.0 else (-0.5 * H, 2)
        if fast:
            cell = _cell(wx, wy, wz, ws, sphere, R, H, g0, g1, g2, bnd)
            n_cand = counts[cell]
        else:  # rare rays skimming the wall: every PMT
            cell = -1
            n_cand = geom.shape[0]
        for k in range(n_cand):
            j = table[cell, k] if fast else k
            best, best_dn, best_j = _disk(px, py, pz, dx, dy, dz, geom, j, limit, best, best_dn, best_j)
    return best, best_dn, best_j


# --------------------------------------------------------------------------------------------------
# the transport loop
# --------------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _coefficients(w, lo, inv_h, tab):
    """(1/mu_tot [m] (inf: nothing interacts), mu_abs/mu_tot, (mu_abs + mu_ray)/mu_tot, n_g/c [ns/m]) at
    wavelength w, linearly interpolated in the table rows [mu_abs, mu_ray, mu_mie, n_g/c]."""
    x = (w - lo) * inv_h
    m = tab.shape[0]
    k = min(max(int(math.floor(x)), 0), m - 2)
    f = x - k
    mu_a = tab[k, 0] + f * (tab[k + 1, 0] - tab[k, 0])
    mu_r = tab[k, 1] + f * (tab[k + 1, 1] - tab[k, 1])
    mu_m = tab[k, 2] + f * (tab[k + 1, 2] - tab[k, 2])
    inv_v = tab[k, 3] + f * (tab[k + 1, 3] - tab[k, 3])
    mu = mu_a + mu_r + mu_m
    if mu > 0.0:
        return 1.0 / mu, mu_a / mu, (mu_a + mu_r) / mu, inv_v
    return math.inf, 1.0, 1.0, inv_v


@njit(parallel=True, cache=True, error_model="numpy")
def _transport(
    pos,
    dir,
    pol,
    t0,
    wl,
    lo,
    inv_h,
    tab,
    sphere,
    R,
    H,
    shell,
    pad,
    tol,
    eps,
    g0,
    g1,
    g2,
    bnd,
    geom,
    table,
    counts,
    r_wall,
    f_diffuse,
    r_pmt,
    mie_g,
    max_rounds,
    seed,
    out_pmt,
    out_t,
    out_cos,
    out_indirect,
    out_steps,
    out_status,
):
    n = pos.shape[0]
    base = np.uint64(seed)
    given_pol = pol.shape[0] == n
    for i in prange(n):
        s = _mix64(base + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15))
        px, py, pz = pos[i, 0], pos[i, 1], pos[i, 2]
        dx, dy, dz = dir[i, 0], dir[i, 1], dir[i, 2]
        inv_mu, p_abs, p_ray, inv_v = _coefficients(wl[i], lo, inv_h, tab)
        # unpolarised light: the random linear polarisation is drawn when first needed (the first Rayleigh
        # scatter), which has the same distribution: mirror reflections map a uniform azimuth about d to a
        # uniform azimuth about d', diffuse ones redraw it
        has_pol = given_pol
        if given_pol:
            s, u = _uniform(s)
            ex, ey, ez = _project(pol[i, 0], pol[i, 1], pol[i, 2], dx, dy, dz, u)
        else:
            ex, ey, ez = 0.0, 0.0, 0.0
        t = t0[i]
        n_sc = 0
        n_rf = 0
        status = TRUNCATED
        steps = 0
        pmt = -1
        cos_inc = 0.0
        # starts outside (on the wall counts as inside, as Detector.inside): dropped
        if sphere:
            outside = px * px + py * py + pz * pz > R * R
        else:
            outside = (px * px + py * py > R * R) | (abs(pz) > 0.5 * H)
        if outside:
            status = OUTSIDE
            max_rounds_i = 0
        else:
            max_rounds_i = max_rounds
        for _ in range(max_rounds_i):
            steps += 1
            s, u0 = _uniform(s)
            s, u1 = _uniform(s)
            d_int = -math.log(u0) * inv_mu
            t_wall, surf = _wall(px, py, pz, dx, dy, dz, sphere, R, H)
            if (
                d_int < t_wall
                and _in_inner(px, py, pz, sphere, R, H, shell)
                and _in_inner(px + d_int * dx, py + d_int * dy, pz + d_int * dz, sphere, R, H, shell)
            ):
                # start and interaction point deeper than every disk: the segment between them lies in that
                # convex volume, so no photocathode is met first (same decision as the full look-up)
                t_pmt, dn, j = math.inf, 0.0, -1
            else:
                t_pmt, dn, j = _first_pmt(
                    px,
                    py,
                    pz,
                    dx,
                    dy,
                    dz,
                    t_wall,
                    surf,
                    sphere,
                    R,
                    H,
                    shell,
                    pad,
                    tol,
                    g0,
                    g1,
                    g2,
                    bnd,
                    geom,
                    table,
                    counts,
                )
            d_bnd = t_pmt if j >= 0 else t_wall
            step = min(d_int, d_bnd)
            if not math.isfinite(step):  # outside the detector / numerical failure: drop
                status = LOST
                break
            t += step * inv_v
            px, py, pz = px + step * dx, py + step * dy, pz + step * dz
            if d_int < d_bnd:  # volume interaction
                if u1 < p_abs:
                    status = DEAD
                    break
                s, r0 = _uniform(s)
                s, r1 = _uniform(s)
                s, r3 = _uniform(s)
                phi = 2.0 * math.pi * r1
                if not has_pol:
                    s, u = _uniform(s)
                    ex, ey, ez = _random_perp(dx, dy, dz, u)
                    has_pol = True
                if u1 >= p_ray:  # Mie: Henyey-Greenstein about the direction
                    dx, dy, dz = _rotate(dx, dy, dz, _hg_cos(r0, mie_g), phi)
                else:  # Rayleigh: dipole pattern about the polarisation
                    dx, dy, dz = _rotate(ex, ey, ez, _dipole_cos(r0), phi)
                ex, ey, ez = _project(ex, ey, ez, dx, dy, dz, r3)
                n_sc += 1
                continue
            if j >= 0:  # PMT glass: reflected, else a photocathode hit
                if u1 >= r_pmt:
                    pmt = j
                    cos_inc = -dn
                    status = DEAD
                    break
                nx, ny, nz = geom[j, 3], geom[j, 4], geom[j, 5]
                diffuse = False
            else:  # wall: reflected (diffuse or specular), else absorbed
                if u1 >= r_wall:
                    status = DEAD
                    break
                nx, ny, nz = _wall_normal(px, py, pz, surf, sphere)
                s, r2 = _uniform(s)
                diffuse = r2 < f_diffuse
            if diffuse:  # Lambert: cos about the normal = sqrt(u); polarisation randomised (drawn if needed)
                s, r0 = _uniform(s)
                s, r1 = _uniform(s)
                dx, dy, dz = _rotate(nx, ny, nz, math.sqrt(r0), 2.0 * math.pi * r1)
                has_pol = False
            else:  # specular: direction and polarisation mirrored
                dd = 2.0 * (dx * nx + dy * ny + dz * nz)
                dx, dy, dz = dx - dd * nx, dy - dd * ny, dz - dd * nz
                pe = 2.0 * (ex * nx + ey * ny + ez * nz)
                ex, ey, ez = ex - pe * nx, ey - pe * ny, ez - pe * nz
            px, py, pz = px + eps * nx, py + eps * ny, pz + eps * nz  # nudge inwards off the surface
            n_rf += 1
        out_pmt[i] = pmt
        out_t[i] = t
        out_cos[i] = cos_inc
        out_indirect[i] = (n_sc + n_rf) > 0
        out_steps[i] = steps
        out_status[i] = status


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
MIN_INTERVALS = 8192  # medium table: >= 8192 intervals over the band (see medium_table)


def medium_table(medium: Any, wl_lo: float, wl_hi: float) -> tuple[float, float, np.ndarray] | None:
    """Optical coefficients of ``medium`` tabulated for linear interpolation in the kernel: (lo [nm],
    1/h [1/nm], rows (M, 4) [mu_abs, mu_ray, mu_mie [1/m], n_g/c [ns/m]]) on a uniform grid over
    [min(wl_lo, medium.wl_min), max(wl_hi, medium.wl_max)] with >= MIN_INTERVALS intervals, chosen so that
    every knot of the medium's own piecewise-linear tables (``medium.interpolation_knots()``) is a grid node:
    the tabulated absorption coefficient is then reproduced exactly, and the smooth laws (Rayleigh power
    law, Sellmeier group index) to ~1e-8 relative (tests/test_transport_cpu.py measures it). None when no
    such grid of at most 8 MIN_INTERVALS intervals exists (the caller then uses the torch transport)."""
    lo = min(float(wl_lo), float(medium.wl_min))
    hi = max(float(wl_hi), float(medium.wl_max))
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        return None
    knots = (
        medium.interpolation_knots().double().cpu().numpy()
        if hasattr(medium, "interpolation_knots")
        else np.zeros(0)
    )
    rel = (knots[(knots > lo) & (knots < hi)] - lo) / (hi - lo)
    base = 1  # smallest interval count that puts every knot on a node: lcm of the knots' denominators
    for q in np.unique(rel):
        base = math.lcm(base, Fraction(float(q)).limit_denominator(8 * MIN_INTERVALS).denominator)
        if base > 8 * MIN_INTERVALS:
            return None
    m = base * math.ceil(MIN_INTERVALS / base)
    x = rel * m
    if m > 8 * MIN_INTERVALS or not np.all(np.abs(x - np.round(x)) < 1e-9 * m):
        return None
    grid = torch.linspace(lo, hi, m + 1, dtype=torch.float64)
    with torch.no_grad():
        cols = []
        for f in (medium.absorption_length, medium.rayleigh_length, medium.mie_length):
            length = torch.as_tensor(f(grid)).to(torch.float64).expand(m + 1)
            cols.append(torch.where(torch.isinf(length), 0.0, 1.0 / length))
        cols.append((medium.group_index(grid) / C_M_PER_NS).to(torch.float64))
    return lo, m / (hi - lo), np.ascontiguousarray(torch.stack(cols, 1).numpy())


def _detector_tables(detector: Any) -> tuple:
    """(geom (P,7) float64 [cx, cy, cz, nx, ny, nz, r^2], table (C,K) int32, counts (C,) int32, grid meta
    (g0, g1, g2), cell boundary directions (g0 + 1, 2) [cos, sin]) of the detector's PMT look-up grid, cached
    on the detector."""
    key = ("numba_tables",)
    cache = detector._cache
    if key not in cache:
        table = detector._table(torch.device("cpu"))  # builds the grid metadata too
        counts = (table < detector.n_pmts).sum(1)
        geom = torch.cat([detector._pos64, detector._nrm64, (detector._rad64 * detector._rad64)[:, None]], 1)
        m = detector._grid_meta
        if detector.height is None:
            g = (int(m["n"]), 0, 0)
            ang = 0.25 * math.pi * (2.0 * np.arange(g[0] + 1) / g[0] - 1.0)
        else:
            g = (int(m["n_phi"]), int(m["n_z"]), int(m["n_c"]))
            ang = -math.pi + 2.0 * math.pi * np.arange(g[0] + 1) / g[0]
        bnd = np.ascontiguousarray(np.stack([np.cos(ang), np.sin(ang)], 1))
        cache[key] = (
            np.ascontiguousarray(geom.numpy()),
            np.ascontiguousarray(table.numpy(), dtype=np.int32),
            np.ascontiguousarray(counts.numpy(), dtype=np.int32),
            g,
            bnd,
        )
    return cache[key]


def transport(
    photons: Any,
    polarization: torch.Tensor | None,
    detector: Any,
    medium_tab: tuple,
    *,
    wall_reflectivity: float,
    diffuse_fraction: float,
    pmt_reflectivity: float,
    mie_g: float,
    max_rounds: int,
    seed: int,
    eps: float,
) -> dict[str, Any]:
    """Transport every photon of ``photons`` (:class:`physics.records.Photons` on CPU) to its death.

    polarization: (N,3) linear polarisation (projected perpendicular to dir here) or None (unpolarised:
    random).
    medium_tab: :func:`medium_table` covering the photons' wavelengths. Returns numpy arrays per photon: pmt
    (N,) int64 (-1 = no cathode hit), t (N,) [ns] at the hit (or at death), cos_incidence (N,), indirect (N,)
    bool (scattered or reflected before the hit), steps (N,) int32 (transport rounds), status (N,) int8
    (DEAD, TRUNCATED at ``max_rounds``, LOST: non-finite geometry, OUTSIDE: started outside the detector,
    not transported). ``seed``: 0 <= seed < 2^63, the chunk's stream seed. ``eps`` [m]: inward nudge after a
    reflection.
    """
    geom, table, counts, (g0, g1, g2), bnd = _detector_tables(detector)

    def arr(x: torch.Tensor) -> np.ndarray:  # float32 or float64 (the kernel reads either), contiguous
        x = x.detach().cpu()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float64)
        return np.ascontiguousarray(x.numpy())

    n = len(photons)
    out = dict(
        pmt=np.empty(n, np.int64),
        t=np.empty(n),
        cos_incidence=np.empty(n),
        indirect=np.empty(n, np.bool_),
        steps=np.empty(n, np.int32),
        status=np.empty(n, np.int8),
    )
    pos = arr(photons.pos)
    pol = np.zeros((0, 3), pos.dtype) if polarization is None else arr(polarization).astype(pos.dtype)
    lo, inv_h, tab = medium_tab
    sphere = detector.height is None
    threads = max(1, min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS))
    with _LAUNCH:
        old = get_num_threads()
        set_num_threads(threads)
        try:
            _transport(
                pos,
                arr(photons.dir),
                pol,
                arr(photons.t),
                arr(photons.wavelength),
                lo,
                inv_h,
                tab,
                sphere,
                float(detector.radius),
                0.0 if sphere else float(detector.height),
                float(detector.shell),
                float(detector.pad),
                float(detector.tol),
                float(eps),
                g0,
                g1,
                g2,
                bnd,
                geom,
                table,
                counts,
                float(wall_reflectivity),
                float(diffuse_fraction),
                float(pmt_reflectivity),
                float(mie_g),
                int(max_rounds),
                int(seed),
                out["pmt"],
                out["t"],
                out["cos_incidence"],
                out["indirect"],
                out["steps"],
                out["status"],
            )
        finally:
            set_num_threads(old)
    return out
