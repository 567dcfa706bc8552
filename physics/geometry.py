"""Detector geometry: cylinder / sphere volumes, PMT photocathode layouts and vectorised ray geometry.

Units: metres. Axis convention: cylinders are centred at the origin with the symmetry axis along z
(caps at z = +-height/2); spheres are centred at the origin.

PMTs are modelled as flat photocathode disks (centre ``pmt_pos`` (P,3), inward unit normal
``pmt_normal`` (P,3), radius ``pmt_radius`` (P,)). Generated layouts inscribe each disk in the wall: on a
curved wall of radius R a disk of radius r tangent to it would poke out by the sagitta r^2/(2R), so its
centre is placed at sqrt(R^2 - r^2) from the axis / centre, making every disk point lie inside the volume.

Ray geometry follows the standard ray-quadric and ray-plane intersection formulas (e.g. Pharr, Jakob &
Humphreys, "Physically Based Rendering", 4th ed., sec. 6.2-6.3), with the cancellation-free quadratic
root q = -(b + sign(b) sqrt(b^2 - ac)), t = {q/a, c/q} (Press et al., Numerical Recipes, 3rd ed., sec. 5.6).

The PMT look-up (``pmt_intersect``) is grid accelerated and exact; see :meth:`Detector.pmt_intersect`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, check_choice, check_keys, check_number, config_dir, load_yaml

SHAPES = ("cylinder", "sphere")
LAYOUTS = ("grid", "fibonacci", "rings", "table")
_LAYOUT_SHAPE = {"grid": "cylinder", "fibonacci": "sphere", "rings": "sphere"}
CAP_LAYOUTS = ("rings", "square")
GOLDEN = (1.0 + 5.0**0.5) / 2.0
_F64 = torch.float64
_TINY = 1e-30
_AX1 = torch.tensor([1, 0, 0])  # cube-map in-face axes for faces normal to x, y, z
_AX2 = torch.tensor([2, 2, 1])
# rays per chunk of the PMT look-up: on CPU the float64 wall geometry and the ray-disk kernel work on
# bounded temporaries (0.5-1 MB per array) instead of 1e6-row ones; 2^17 was the fastest of 2^13..2^20 on a
# 2-core CPU (smaller chunks lose to per-op overhead). On a GPU each op of a chunk is one kernel launch of
# ~5-10 us host time, so chunks are 2^22 rays (~30 MB per float64 temporary): with 2^17 a 1e7-photon SK
# transport on an H100 made 54k launches for 0.11 s of GPU work and ran at 1.3e7 photon-steps/s.
# Results are per ray, independent of the chunking.
_RAY_CHUNK = 1 << 17
_RAY_CHUNK_GPU = 1 << 22


def ray_chunk(device: torch.device) -> int:
    """Rays per chunk of the PMT look-up on ``device`` (see ``_RAY_CHUNK``)."""
    return _RAY_CHUNK if device.type == "cpu" else _RAY_CHUNK_GPU


class PresetRow(NamedTuple):
    """One row of :func:`list_presets` (lengths in m)."""

    name: str
    shape: str
    radius: float
    height: float | None
    n_pmts: int
    photocoverage: float


# ----------------------------------------------------------------------------------------------------
# small vectorised helpers
# ----------------------------------------------------------------------------------------------------
_COMPILED: dict[str, Any] = {}


def compile_enabled() -> bool:
    """True when the environment variable PHOTONFIT_COMPILE is "1": the ray-disk kernel of the PMT look-up
    (:meth:`Detector._grid_hits`) is then wrapped in ``torch.compile(dynamic=True)`` (opt-in: a one-off
    compile of ~15-25 s per process; never on by default so that tests and short runs do not pay it).
    Checked bit-identical to the eager kernel on 'wcte' (1e6 rays) and 'sk' (2e5 rays)."""
    return os.environ.get("PHOTONFIT_COMPILE", "0") == "1"


def maybe_compiled(fn: Any, name: str) -> Any:
    """``fn`` itself, or its cached ``torch.compile(fn, dynamic=True)`` when :func:`compile_enabled`."""
    if not compile_enabled():
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
}


def select(cond: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """``torch.where(cond, a, b)``, bit-identical, faster on CPU.

    On CPU (no autograd) the choice is made with integer masks on the bit patterns,
    ``r = ((a ^ b) & -cond) ^ b`` (a branch-free select, e.g. Warren, *Hacker's Delight*, 2nd ed., sec. 2-20),
    which vectorises: 4-5x faster than ``torch.where`` in torch 2.x on a 2-core CPU; every value (inf, NaN,
    -0) is copied exactly. cond (any shape broadcastable to a's), a and b tensors of the same shape and dtype
    (or Python numbers, filled in the other's dtype). Falls back to ``torch.where`` on other devices, inside
    torch.compile, for other dtypes/shapes and when a gradient is needed.
    """
    ta, tb = isinstance(a, Tensor), isinstance(b, Tensor)
    if not (ta or tb) or cond.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.where(cond, a, b)  # (a compiled graph fuses torch.where itself)
    if (not ta and isinstance(a, float) and not b.is_floating_point()) or (
        not tb and isinstance(b, float) and not a.is_floating_point()
    ):
        return torch.where(cond, a, b)  # type promotion to floating point: leave it to torch
    if not ta:
        a = torch.full_like(b, a)
    elif not tb:
        b = torch.full_like(a, b)
    it = _BITS.get(a.dtype)
    if (
        it is None
        or a.dtype != b.dtype
        or a.shape != b.shape
        or cond.dtype != torch.bool
        or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    ):
        return torch.where(cond, a, b)
    if cond.shape != a.shape:
        try:
            cond = cond.expand(a.shape)
        except RuntimeError:
            return torch.where(cond, a, b)
    bi = b.contiguous().view(it)
    r = a.contiguous().view(it) ^ bi
    r &= cond.to(it).neg_()
    r ^= bi
    return r.view(a.dtype)


def components(x: Tensor) -> Tensor:
    """(N,k) -> contiguous (k, N) components (no autograd; treat as read-only: when x is already the
    transposed view of a contiguous (k, N) tensor, that memory is returned without a copy). On CPU through
    NumPy, whose strided copy is ~7x faster than ``x.t().contiguous()`` in torch 2.x; elementwise kernels on
    contiguous rows then run ~1.7x faster than on the strided columns of x. Same values."""
    x = x.detach()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 2:
        return torch.from_numpy(np.ascontiguousarray(x.numpy().T))
    return x.t().contiguous()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _exit_root(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Largest root of a t^2 + 2 b t + c = 0 for a start point inside (c <= 0), a >= 0; inf if a == 0.

    Cancellation-free and NaN-free (also in the backward pass) for a == 0 and c == 0.
    """
    sq = torch.sqrt((b * b - a * c).clamp_min(_TINY))
    t = select(b >= 0, -c / (b + sq).clamp_min(_TINY), (sq - b) / a.clamp_min(_TINY))
    return select(a > 0, t.clamp_min(0.0), math.inf)


def _pairs_within(a: Tensor, b: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """All index pairs (i, j) with |a_i - b_j| <= cutoff, by spatial hashing (O(M + P) memory, no loops
    over points). a (M,3), b (P,3) float64 on CPU. Returns (ia, ib) long tensors."""
    cell = max(float(cutoff), 1e-9)
    lo = torch.minimum(a.min(0).values, b.min(0).values) - 2 * cell
    ka, kb = ((a - lo) / cell).floor().long(), ((b - lo) / cell).floor().long()
    span = int(torch.maximum(ka.max(0).values, kb.max(0).values).max()) + 3

    def key(k: Tensor) -> Tensor:
        return (k[:, 0] * span + k[:, 1]) * span + k[:, 2]

    hb, order = torch.sort(key(kb))
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    ha = key((ka[None] + offsets[:, None]).reshape(-1, 3))  # 27 neighbouring hash cells of every point
    start = torch.searchsorted(hb, ha, right=False)
    count = torch.searchsorted(hb, ha, right=True) - start
    q = torch.repeat_interleave(torch.arange(len(ha)), count)
    first = torch.cumsum(count, 0) - count
    ia, ib = q % len(a), order[start[q] + torch.arange(len(q)) - first[q]]
    keep = (a[ia] - b[ib]).norm(dim=-1) <= cutoff
    return ia[keep], ib[keep]


# ----------------------------------------------------------------------------------------------------
# layouts (float64, CPU)
# ----------------------------------------------------------------------------------------------------
def fibonacci_sphere(n: int, radius: float, pmt_radius: float, setback: float = 0.0) -> tuple[Tensor, Tensor]:
    """Fibonacci (golden-angle) lattice of ``n`` PMTs on a sphere of ``radius`` [m].

    Points z_i = 1 - (2i+1)/n, phi_i = 2 pi i / golden ratio: every point carries the same area 4 pi / n
    (Gonzalez, Math. Geosci. 42 (2010) 49; Swinbank & Purser, QJRMS 132 (2006) 1769). Disk centres are
    inscribed at sqrt(R^2 - r^2) - setback. Returns pos (n,3), inward normal (n,3).
    """
    i = torch.arange(n, dtype=_F64)
    z = 1.0 - (2.0 * i + 1.0) / n
    phi = torch.remainder(2.0 * math.pi * i / GOLDEN, 2.0 * math.pi)
    rho = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    u = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], -1)
    return u * (math.sqrt(radius**2 - pmt_radius**2) - setback), -u


def _ring_count(rho: Tensor, s: float) -> Tensor:
    """Largest number of points on a circle of radius rho [m] with neighbour chord >= s:
    n = floor(pi / asin(s / (2 rho))) (1 when 2 rho < s)."""
    x = s / (2 * rho.clamp_min(_TINY))
    n = torch.floor(math.pi / torch.asin(x.clamp(max=1.0)) + 1e-9).long()
    return torch.where(x > 1, 1, n)


def _rings_xy(rho: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """Points on concentric circles of radii rho (M,) with chord spacing >= s, odd circles rotated by half
    a step. Returns the circle index (P,) and azimuth (P,) [rad]."""
    counts = _ring_count(rho, s)
    ring = torch.repeat_interleave(torch.arange(len(rho)), counts)
    j = torch.arange(len(ring)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return ring, 2 * math.pi * (j.to(_F64) + 0.5 * (ring % 2)) / counts[ring]


def sphere_rings(
    radius: float, pmt_radius: float, spacing: float, setback: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Latitude-ring layout on a sphere (as used for the JUNO 20-inch PMTs, arXiv:2104.02565 sec. 2.2).

    n_theta = floor(pi / (2 asin(s / 2 R_c))) rings at theta_k = (k + 1/2) pi / n_theta (ring-to-ring
    chord >= s), each holding floor(pi / asin(s / 2 rho_k)) PMTs (in-ring chord >= s), R_c =
    sqrt(R^2 - r^2) - setback. Packs up to ~pi/4 coverage at s = 2r, denser than a Fibonacci lattice,
    whose nearest-neighbour distance is only ~0.89 of the hexagonal one. Returns pos (P,3), normal (P,3).
    """
    rc = math.sqrt(radius**2 - pmt_radius**2) - setback
    n_th = max(1, int(math.pi / (2 * math.asin(min(1.0, spacing / (2 * rc))))))
    th = (torch.arange(n_th, dtype=_F64) + 0.5) * math.pi / n_th
    ring, phi = _rings_xy(rc * torch.sin(th), spacing)
    st, ct = torch.sin(th[ring]), torch.cos(th[ring])
    u = torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct], -1)
    return rc * u, -u


def cylinder_grid(
    radius: float,
    height: float,
    pmt_radius: float,
    spacing: float,
    cap_layout: str = "rings",
    setback: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Barrel grid (rings in z x columns in phi) plus end caps, all with nominal pitch ``spacing`` [m].

    Barrel: n_ring = floor(H / s) rings at cell centres, n_col = floor(pi / asin(s / 2 rho)) columns
    (chord >= s), disk centres inscribed at rho = sqrt(R^2 - r^2) - setback. Caps (z = +-(H/2 - setback)):
    a square grid (x, y on multiples of s) or concentric rings (ring k at radius k s, chord >= s, odd rings
    rotated by half a step); only disks fully inside the cap (rho + r <= R) and not overlapping a barrel
    disk (centre distance >= r_i + r_j) are kept. Returns pos (P,3), inward normal (P,3).
    """
    R, H, r, s = float(radius), float(height), float(pmt_radius), float(spacing)
    rho = math.sqrt(R * R - r * r) - setback
    n_col = int(_ring_count(torch.tensor([rho], dtype=_F64), s)[0])
    n_ring = max(1, int(H / s))
    phi = 2 * math.pi * (torch.arange(n_col, dtype=_F64) + 0.5) / n_col
    z = -H / 2 + (torch.arange(n_ring, dtype=_F64) + 0.5) * H / n_ring
    pp, zz = torch.meshgrid(phi, z, indexing="ij")
    pp, zz = pp.reshape(-1), zz.reshape(-1)
    barrel = torch.stack([rho * torch.cos(pp), rho * torch.sin(pp), zz], -1)
    barrel_n = torch.stack([-torch.cos(pp), -torch.sin(pp), torch.zeros_like(pp)], -1)
    if cap_layout == "square":
        k = torch.arange(-int(R / s) - 1, int(R / s) + 2, dtype=_F64) * s
        xx, yy = torch.meshgrid(k, k, indexing="ij")
        xy = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    else:
        rr = torch.arange(0, int(R / s) + 2, dtype=_F64) * s
        ring, ang = _rings_xy(rr, s)
        xy = torch.stack([rr[ring] * torch.cos(ang), rr[ring] * torch.sin(ang)], -1)
    xy = xy[xy.norm(dim=-1) + r <= R * (1 + 1e-12)]
    zc = H / 2 - setback
    caps = torch.cat(
        [
            torch.cat([xy, torch.full((len(xy), 1), zc, dtype=_F64)], 1),
            torch.cat([xy, torch.full((len(xy), 1), -zc, dtype=_F64)], 1),
        ]
    )
    caps_n = torch.cat(
        [
            torch.tensor([[0.0, 0.0, -1.0]], dtype=_F64).expand(len(xy), 3),
            torch.tensor([[0.0, 0.0, 1.0]], dtype=_F64).expand(len(xy), 3),
        ]
    )
    rim = (caps[:, :2].norm(dim=-1) > rho - 2 * r).nonzero()[:, 0]  # only these can touch a barrel disk
    edge = (barrel[:, 2].abs() > zc - 2 * r).nonzero()[:, 0]
    if len(rim) and len(edge):
        ic, _ = _pairs_within(caps[rim], barrel[edge], 2 * r)
        keep = torch.ones(len(caps), dtype=torch.bool)
        keep[rim[ic]] = False
        caps, caps_n = caps[keep], caps_n[keep]
    return torch.cat([barrel, caps]), torch.cat([barrel_n, caps_n])


def read_pmt_table(path: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor]:
    """Read a PMT table: CSV with header ``x,y,z,nx,ny,nz,r`` [m] or HDF5 with datasets ``pos`` (P,3),
    ``normal`` (P,3), ``radius`` (P,) [m]. Returns float64 (pos, normal, radius)."""
    p = Path(path)
    field = f"pmt.file {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{field}: file does not exist (expected a CSV or HDF5 PMT table)")
    if p.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        with h5py.File(p, "r") as f:
            missing = [k for k in ("pos", "normal", "radius") if k not in f]
            if missing:
                raise ConfigError(
                    f"{field}: missing dataset(s) {missing}; required: pos (P,3), normal (P,3), radius (P,)"
                )
            pos, nrm, rad = (np.asarray(f[k], dtype=np.float64) for k in ("pos", "normal", "radius"))
    elif p.suffix.lower() == ".csv":
        header = [h.strip() for h in p.open().readline().strip().split(",")]
        if header != ["x", "y", "z", "nx", "ny", "nz", "r"]:
            raise ConfigError(f"{field}: header {header}; expected ['x', 'y', 'z', 'nx', 'ny', 'nz', 'r']")
        try:
            data = np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise ConfigError(f"{field}: unreadable numbers ({exc}); expected 7 numeric columns") from exc
        if data.shape[1] != 7:
            raise ConfigError(f"{field}: {data.shape[1]} columns; expected 7 (x,y,z,nx,ny,nz,r)")
        pos, nrm, rad = data[:, :3], data[:, 3:6], data[:, 6]
    else:
        raise ConfigError(f"{field}: suffix {p.suffix!r}; allowed: .csv, .h5, .hdf5")
    if pos.ndim != 2 or pos.shape[1:] != (3,) or nrm.shape != pos.shape or rad.shape != pos.shape[:1]:
        raise ConfigError(
            f"{field}: shapes pos {pos.shape}, normal {nrm.shape}, radius {rad.shape}; "
            "expected (P,3), (P,3), (P,)"
        )
    return torch.from_numpy(pos), torch.from_numpy(nrm), torch.from_numpy(rad)


# ----------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------
class Detector:
    """Cylinder or sphere filled with a homogeneous medium, read out by disk photocathodes.

    Attributes: name, shape ('cylinder' | 'sphere'), radius [m], height [m] (None for a sphere),
    pmt_pos (P,3) [m], pmt_normal (P,3) inward unit normals, pmt_radius (P,) [m], n_pmts,
    wall_area [m^2], photocoverage = sum(pi r_i^2) / wall_area, tol [m] (geometric tolerance).
    Tensors live on ``device`` with ``dtype``; ray queries follow the dtype and device of their input.
    """

    def __init__(
        self,
        name: str,
        shape: str,
        radius: float,
        height: float | None,
        pmt_pos: Tensor,
        pmt_normal: Tensor,
        pmt_radius: Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        field: str = "pmt",
        cell_m: float | None = None,
    ) -> None:
        check_choice(shape, "shape", SHAPES)
        self.name, self.shape = str(name), shape
        self.radius = check_number(radius, "radius_m", minimum=0.0, strict_min=True)
        if shape == "cylinder":
            self.height: float | None = check_number(height, "height_m", minimum=0.0, strict_min=True)
        elif height is not None:
            raise ConfigError(f"height_m: got {height!r} for a sphere; allowed: absent (None)")
        else:
            self.height = None
        pos, nrm, rad = (torch.as_tensor(x, dtype=_F64).cpu() for x in (pmt_pos, pmt_normal, pmt_radius))
        self._validate(pos, nrm, rad, field)
        self._pos64, self._nrm64, self._rad64 = pos, nrm, rad
        self.scale = self.radius if self.height is None else max(self.radius, self.height)
        self.tol = 1e-5 * self.scale
        self.wall_area = _wall_area(self.radius, self.height)
        self.photocoverage = float((math.pi * rad**2).sum() / self.wall_area)
        self.n_pmts = int(len(rad))
        spacing = math.sqrt(self.wall_area / self.n_pmts)
        # wall-cell size of the PMT look-up: half the PMT pitch (~2-3 candidate disks per ray). A quarter
        # (~1 candidate) measured the same on 'wcte' (2.9e6 vs 2.8e6 photon-steps/s), 1.2e6 vs 2.4e6 on 'sk'
        # (bench_optics, 2 threads, quiet 2-core CPU): the 4x larger candidate table costs more than it saves
        self.cell_m = float(cell_m) if cell_m is not None else 0.5 * spacing
        # shell depth D: every disk point lies within D of the wall (bound per disk, see _disk_depth)
        self.shell = (
            float(self._disk_depth(pos, nrm, rad).max().clamp_min(0)) * (1 + 1e-6) + 1e-6 * self.scale
        )
        self.pad = max(0.5 * self.cell_m, 2 * self.shell)  # fast-path limit on the path in the shell [m]
        self.dtype, self.device = dtype, torch.device(device)
        self._cache: dict[Any, Any] = {}
        self._move()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _move(self) -> None:
        kw = dict(dtype=self.dtype, device=self.device)
        self.pmt_pos, self.pmt_normal, self.pmt_radius = (
            x.to(**kw) for x in (self._pos64, self._nrm64, self._rad64)
        )

    def pmt_table(self) -> dict[str, Tensor]:
        """The PMT table in float64 on the CPU, as built: pmt_pos (P,3) [m], pmt_normal (P,3), pmt_radius
        (P,) [m] (what run files record; ``Detector(name, shape, radius, height, **pmt_table())`` rebuilds
        it)."""
        return {"pmt_pos": self._pos64, "pmt_normal": self._nrm64, "pmt_radius": self._rad64}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Detector:
        """Move (in place, like nn.Module.to) the PMT tensors to ``device`` / ``dtype``; returns self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        self._move()
        return self

    def __repr__(self) -> str:
        h = "" if self.height is None else f", height={self.height:g} m"
        return (
            f"Detector({self.name!r}, {self.shape}, radius={self.radius:g} m{h}, n_pmts={self.n_pmts}, "
            f"photocoverage={self.photocoverage:.3f})"
        )

    # -- validation ----------------------------------------------------------------------------------
    def _wall_distance(self, p: Tensor) -> Tensor:
        """Signed distance [m] of points (N,3) to the wall, positive inside."""
        if self.height is None:
            return self.radius - p.norm(dim=-1)
        return torch.minimum(self.radius - p[:, :2].norm(dim=-1), self.height / 2 - p[:, 2].abs())

    def _disk_depth(self, pos: Tensor, nrm: Tensor, rad: Tensor) -> Tensor:
        """Upper bound on the wall distance of any point of each disk [m] (P,).

        For a disk (c, n, r) and unit vector e, min over the disk of q.e = c.e - r sqrt(1 - (n.e)^2).
        """

        def reach(e: Tensor) -> Tensor:
            return rad * torch.sqrt((1 - _dot(nrm, e) ** 2).clamp_min(0))

        if self.height is None:
            e = pos / pos.norm(dim=-1, keepdim=True).clamp_min(_TINY)
            return self.radius - (pos.norm(dim=-1) - reach(e))
        rho = pos[:, :2].norm(dim=-1)
        e = torch.cat([pos[:, :2] / rho[:, None].clamp_min(_TINY), torch.zeros_like(rho)[:, None]], 1)
        ez = torch.zeros_like(pos)
        ez[:, 2] = 1
        return torch.minimum(self.radius - (rho - reach(e)), self.height / 2 - (pos[:, 2].abs() - reach(ez)))

    def _validate(self, pos: Tensor, nrm: Tensor, rad: Tensor, field: str) -> None:
        P = len(rad)
        if pos.ndim != 2 or pos.shape != (P, 3) or nrm.shape != (P, 3) or rad.ndim != 1 or P == 0:
            raise ConfigError(
                f"{field}: shapes pos {tuple(pos.shape)}, normal {tuple(nrm.shape)}, radius "
                f"{tuple(rad.shape)}; expected (P,3), (P,3), (P,) with P >= 1"
            )
        bad = ~(torch.isfinite(pos).all(1) & torch.isfinite(nrm).all(1) & torch.isfinite(rad))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ConfigError(f"{field}[{i}]: non-finite entry; allowed: finite numbers")
        bad = rad <= 0
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ConfigError(f"{field}.radius[{i}]: got {float(rad[i])!r}; allowed: > 0 m")
        err = (nrm.norm(dim=-1) - 1).abs()
        if (err > 1e-6).any():
            i = int(err.argmax())
            raise ConfigError(
                f"{field}.normal[{i}]: got {nrm[i].tolist()} (norm {float(nrm[i].norm()):.6g}); "
                "allowed: unit vectors (|n| = 1 within 1e-6)"
            )
        tol_out = 1e-4 + 1e-6 * max(self.radius, self.height or 0.0)
        wd = self._wall_distance(pos)
        if (wd < -tol_out).any():
            i = int(wd.argmin())
            dims = f"radius {self.radius} m" + ("" if self.height is None else f", height {self.height} m")
            raise ConfigError(
                f"{field}.pos[{i}]: got {pos[i].tolist()}, outside the {self.shape} ({dims}) by "
                f"{-float(wd[i]):.4g} m; allowed: on or inside the wall (tolerance {tol_out:.2g} m)"
            )
        if self.height is None:
            inward = -pos / pos.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        else:
            rho = pos[:, :2].norm(dim=-1, keepdim=True).clamp_min(_TINY)
            barrel = (self.radius - rho[:, 0]) <= (self.height / 2 - pos[:, 2].abs())
            inward = torch.where(
                barrel[:, None],
                torch.cat([-pos[:, :2] / rho, torch.zeros_like(rho)], 1),
                torch.stack([0 * rho[:, 0], 0 * rho[:, 0], -torch.sign(pos[:, 2])], 1),
            )
        cosw = _dot(nrm, inward)
        if (cosw <= 0).any():
            i = int(cosw.argmin())
            raise ConfigError(
                f"{field}.normal[{i}]: got {nrm[i].tolist()} at pos {pos[i].tolist()}, pointing "
                "out of the detector; allowed: normals facing inward (n . inward wall normal > 0)"
            )
        ia, ib = _pairs_within(pos, pos, 2 * float(rad.max()))
        d = (pos[ia] - pos[ib]).norm(dim=-1)
        over = (ia < ib) & (d < (rad[ia] + rad[ib]) * (1 - 1e-9))
        if over.any():
            k = int(over.nonzero()[0])
            i, j = int(ia[k]), int(ib[k])
            raise ConfigError(
                f"{field}: PMTs {i} and {j} overlap (centre distance {float(d[k]):.4g} m < r_i + r_j "
                f"= {float(rad[i] + rad[j]):.4g} m); allowed: centre distance >= r_i + r_j"
            )

    # -- construction from configs --------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> Detector:
        """Load a preset ('wcte' default, 'iwcd', 'sk', 'hk', 'juno') or a detector YAML file path."""
        name = "wcte" if name_or_path is None else str(name_or_path)
        p = Path(name)
        if p.suffix.lower() in (".yaml", ".yml") or p.is_file() or os.sep in name:
            return cls.from_config(load_yaml(p), base_dir=p.resolve().parent, **kwargs)
        presets = preset_names()
        if name not in presets:
            raise ConfigError(f"detector: got {name!r}; allowed presets: {presets} or a path to a YAML file")
        path = config_dir() / "detectors" / f"{name}.yaml"
        return cls.from_config(load_yaml(path), base_dir=path.parent, **kwargs)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], base_dir: str | os.PathLike = ".", **kwargs: Any) -> Detector:
        """Build a detector from a config mapping (schema in configs/detectors/wcte.yaml)."""
        check_keys(
            cfg,
            required=("name", "shape", "radius_m", "pmt"),
            optional=("height_m", "description"),
            where="detector",
        )
        if not isinstance(cfg["name"], str):
            raise ConfigError(f"name: got {cfg['name']!r} ({type(cfg['name']).__name__}); expected a string")
        shape = check_choice(cfg["shape"], "shape", SHAPES)
        R = check_number(cfg["radius_m"], "radius_m", minimum=0.0, strict_min=True)
        H = None
        if shape == "cylinder":
            if "height_m" not in cfg:
                raise ConfigError("detector: missing required key(s) ['height_m'] (required for a cylinder)")
            H = check_number(cfg["height_m"], "height_m", minimum=0.0, strict_min=True)
        elif cfg.get("height_m") is not None:
            raise ConfigError(f"height_m: got {cfg['height_m']!r} for a sphere; allowed: absent")
        pc = cfg["pmt"]
        if not isinstance(pc, dict):
            raise ConfigError(f"pmt: got {pc!r} ({type(pc).__name__}); expected a mapping")
        layout = check_choice(pc.get("layout"), "pmt.layout", LAYOUTS)
        if layout == "table":
            check_keys(pc, required=("layout", "file"), where="pmt")
            if not isinstance(pc["file"], str):
                raise ConfigError(
                    f"pmt.file: got {pc['file']!r}; expected a path string (relative to the YAML)"
                )
            pos, nrm, rad = read_pmt_table(Path(base_dir) / pc["file"])
            return cls(cfg["name"], shape, R, H, pos, nrm, rad, field=f"pmt (file {pc['file']})", **kwargs)
        opt = ("n_target", "spacing_m", "setback_m") + (("cap_layout",) if layout == "grid" else ())
        check_keys(pc, required=("layout", "radius_m"), optional=opt, where="pmt")
        if _LAYOUT_SHAPE[layout] != shape:
            ok = [k for k, v in _LAYOUT_SHAPE.items() if v == shape] + ["table"]
            raise ConfigError(f"pmt.layout: got {layout!r} for a {shape}; allowed: {ok}")
        if ("n_target" in pc) == ("spacing_m" in pc):
            raise ConfigError(
                f"pmt: keys n_target / spacing_m: got {sorted(set(pc) & {'n_target', 'spacing_m'})}; "
                "allowed: exactly one of them"
            )
        r = check_number(pc["radius_m"], "pmt.radius_m", minimum=0.0, strict_min=True)
        sb = check_number(pc.get("setback_m", 0.0), "pmt.setback_m", minimum=0.0, maximum=0.5 * R)
        if r >= 0.25 * R:
            raise ConfigError(f"pmt.radius_m: got {r!r}; allowed: < radius_m / 4 = {R / 4:g}")
        if layout == "fibonacci":
            if "n_target" in pc:
                n = check_number(pc["n_target"], "pmt.n_target", minimum=1, integer=True)
            else:
                s = check_number(pc["spacing_m"], "pmt.spacing_m", minimum=0.0, strict_min=True)
                n = max(1, round(4 * math.pi * R * R / (0.5 * math.sqrt(3) * s * s)))  # hexagonal cell area
            pos, nrm = fibonacci_sphere(n, R, r, sb)
        else:
            if layout == "grid":
                cap = check_choice(pc.get("cap_layout", "rings"), "pmt.cap_layout", CAP_LAYOUTS)

                def make(s: float) -> tuple[Tensor, Tensor]:
                    return cylinder_grid(R, H, r, s, cap, sb)
            else:

                def make(s: float) -> tuple[Tensor, Tensor]:
                    return sphere_rings(R, r, s, sb)

            if "spacing_m" in pc:
                s = check_number(pc["spacing_m"], "pmt.spacing_m", minimum=2 * r)
            else:
                n = check_number(pc["n_target"], "pmt.n_target", minimum=1, integer=True)
                s = _solve_spacing(lambda s: len(make(s)[0]), n, 2 * r, math.sqrt(_wall_area(R, H) / n))
            pos, nrm = make(s)
        rad = torch.full((len(pos),), r, dtype=_F64)
        return cls(cfg["name"], shape, R, H, pos, nrm, rad, field=f"pmt (layout {layout})", **kwargs)

    # -- ray geometry ---------------------------------------------------------------------------------
    def inside(self, points: Tensor) -> Tensor:
        """(N,3) [m] -> (N,) bool, True for points inside or on the wall."""
        if points.dim() == 2 and points.device.type == "cpu" and points.shape[0] > 4096:
            # contiguous components: x*x + y*y (+ z*z) is exactly the pow-and-sum below, ~3x faster
            x, y, z = components(points)
            if self.height is None:
                return x * x + y * y + z * z <= self.radius**2
            return (x * x + y * y <= self.radius**2) & (z.abs() <= self.height / 2)
        if self.height is None:
            return (points * points).sum(-1) <= self.radius**2
        return ((points[..., :2] ** 2).sum(-1) <= self.radius**2) & (points[..., 2].abs() <= self.height / 2)

    def _wall(self, pos: Tensor, dir: Tensor) -> tuple[Tensor, Tensor]:
        """Exit distance [m] (N,) and surface id (0 barrel/sphere, 1 top cap, 2 bottom cap)."""
        return self._wall_xyz(pos.unbind(-1), dir.unbind(-1))

    def _wall_xyz(self, p: tuple[Tensor, ...], d: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """:meth:`_wall` on components p = (x, y, z), d = (dx, dy, dz), each (N,) (explicit sums are much
        faster on CPU than reductions over a length-3 last axis)."""
        (px, py, pz), (dx, dy, dz) = p, d
        if self.height is None:
            a, b = dx * dx + dy * dy + dz * dz, px * dx + py * dy + pz * dz
            t = _exit_root(a, b, px * px + py * py + pz * pz - self.radius**2)
            return t, torch.zeros_like(t, dtype=torch.long)
        a = dx * dx + dy * dy
        b = px * dx + py * dy
        c = px * px + py * py - self.radius**2
        tb = _exit_root(a, b, c)
        # cap plane zc = +-H/2 by the sign of dz (dz = +-0 gives tc = inf below whatever zc is); the division
        # by dz = 0 (inf or NaN) is replaced by inf, as is the whole cap branch then
        zc = torch.full_like(dz, self.height / 2).copysign_(dz)
        if torch.is_grad_enabled() and (pz.requires_grad or dz.requires_grad):
            nz = dz != 0
            tc = torch.where(nz, ((zc - pz) / torch.where(nz, dz, 1.0)).clamp_min(0.0), math.inf)
        else:
            tc = select(dz != 0, zc.sub_(pz).div_(dz).clamp_min_(0.0), math.inf)
        cap = tc < tb
        surf = cap.long() * (1 + (dz <= 0).long())  # 0 barrel, 1 top cap (dz > 0), 2 bottom cap
        return select(cap, tc, tb), surf

    def wall_intersect(self, pos: Tensor, dir: Tensor) -> tuple[Tensor, Tensor]:
        """Distance [m] (N,) from points inside (N,3) along unit directions (N,3) to the wall, and the
        inward unit normal (N,3) at the exit point. Exact (barrel quadratic + both caps, or sphere);
        rays parallel to the axis or in a z = const plane give finite results without NaN."""
        t, surf = self.wall_distance(pos, dir)
        return t, self.wall_normal(pos, dir, t, surf)

    def wall_distance(self, pos: Tensor, dir: Tensor) -> tuple[Tensor, Tensor]:
        """First half of :meth:`wall_intersect`: distance [m] (N,) to the wall and the exit surface id (N,)
        long (0 barrel / sphere, 1 top cap, 2 bottom cap), for callers that need the normal only for some
        rays (see :meth:`wall_normal`)."""
        if pos.dim() == 2 and not (torch.is_grad_enabled() and (pos.requires_grad or dir.requires_grad)):
            # contiguous components: elementwise kernels on the strided columns of (N,3) tensors run ~1.7x
            # slower on CPU; same arithmetic, same values
            return self._wall_xyz(tuple(components(pos)), tuple(components(dir)))
        return self._wall_xyz(pos.unbind(-1), dir.unbind(-1))

    def wall_normal(self, pos: Tensor, dir: Tensor, t: Tensor, surf: Tensor) -> Tensor:
        """Inward unit normal (N,3) at the exit point pos + t dir of rays (N,3) with wall distance t (N,)
        and surface id surf (N,) from :meth:`wall_distance`."""
        p, d = pos.unbind(-1), dir.unbind(-1)  # components: explicit sums beat length-3 reductions on CPU
        if self.height is None:
            h = [p[i] + t * d[i] for i in range(3)]
            den = -torch.sqrt(h[0] * h[0] + h[1] * h[1] + h[2] * h[2]).clamp_min(_TINY)
            return torch.stack([h[0] / den, h[1] / den, h[2] / den], 1)
        barrel = surf == 0
        tb = torch.where(barrel, t, 0.0)  # avoid inf * 0 on the cap branch
        hx, hy = p[0] + tb * d[0], p[1] + tb * d[1]
        den = -torch.sqrt(hx * hx + hy * hy).clamp_min(_TINY)
        nz = torch.where(barrel, 0.0, torch.where(surf == 1, -1.0, 1.0)).to(pos.dtype)
        return torch.stack([torch.where(barrel, hx / den, 0.0), torch.where(barrel, hy / den, 0.0), nz], 1)

    def sample_fiducial(
        self, n: int, generator: torch.Generator | None = None, margin: float = 0.5
    ) -> Tensor:
        """n points (n,3) [m] uniform in the volume shrunk by ``margin`` [m] on every side.

        Cylinder: rho = (R - m) sqrt(u1), phi = 2 pi u2, z uniform; sphere: r = (R - m) u1^(1/3) times an
        isotropic direction (inverse-CDF sampling of the volume element). Draws on the generator's device.
        """
        m = check_number(margin, "margin", minimum=0.0)
        lim = self.radius if self.height is None else min(self.radius, self.height / 2)
        if m >= lim:
            raise ConfigError(f"margin: got {margin!r}; allowed: < {lim:g} m for detector {self.name!r}")
        dev = generator.device if generator is not None else self.device
        u = torch.rand(n, 3, generator=generator, device=dev, dtype=self.dtype).to(self.device)
        R = self.radius - m
        if self.height is None:
            ct, phi = 2 * u[:, 1] - 1, 2 * math.pi * u[:, 2]
            st = torch.sqrt((1 - ct * ct).clamp_min(0))
            return R * u[:, :1].pow(1 / 3) * torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct], 1)
        rho, phi = R * torch.sqrt(u[:, 0]), 2 * math.pi * u[:, 1]
        z = (self.height - 2 * m) * (u[:, 2] - 0.5)
        return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], 1)

    # -- PMT look-up -----------------------------------------------------------------------------------
    def _cells(self) -> tuple[Tensor, Tensor, dict[str, int]]:
        """Cell centres (C,3), conservative cell radii (C,) [m] of the wall look-up grid (float64)."""
        cs, R = self.cell_m, self.radius
        if self.height is None:  # equi-angular cube map, n x n cells per face
            n = max(1, math.ceil(0.5 * math.pi * R / cs))
            g = -1 + 2 * torch.arange(n + 1, dtype=_F64) / n
            gc = 0.5 * (g[1:] + g[:-1])
            cen, rad = [], []
            for f in range(6):

                def pt(a: Tensor, b: Tensor, f: int = f) -> Tensor:
                    axis, sgn = f // 2, 1.0 - 2.0 * (f % 2)
                    v = torch.zeros(*a.shape, 3, dtype=_F64)
                    v[..., axis] = sgn
                    v[..., int(_AX1[axis])] = torch.tan(a * math.pi / 4)
                    v[..., int(_AX2[axis])] = torch.tan(b * math.pi / 4)
                    return R * v / v.norm(dim=-1, keepdim=True)

                ai, bi = torch.meshgrid(gc, gc, indexing="ij")
                c = pt(ai, bi)
                corners = [
                    pt(*torch.meshgrid(g[i : i + n], g[j : j + n], indexing="ij"))
                    for i in (0, 1)
                    for j in (0, 1)
                ]
                rad.append(torch.stack([(k - c).norm(dim=-1) for k in corners]).amax(0).reshape(-1))
                cen.append(c.reshape(-1, 3))
            return torch.cat(cen), torch.cat(rad), {"n": n}
        H = self.height
        n_phi, n_z, n_c = (
            max(3, math.ceil(2 * math.pi * R / cs)),
            max(1, math.ceil(H / cs)),
            max(1, math.ceil(2 * R / cs)),
        )
        phi = -math.pi + 2 * math.pi * (torch.arange(n_phi, dtype=_F64) + 0.5) / n_phi
        z = -H / 2 + H * (torch.arange(n_z, dtype=_F64) + 0.5) / n_z
        pp, zz = torch.meshgrid(phi, z, indexing="ij")
        barrel = torch.stack([R * torch.cos(pp), R * torch.sin(pp), zz], -1).reshape(-1, 3)
        rb = math.hypot(2 * R * math.sin(math.pi / (2 * n_phi)), H / (2 * n_z))  # arc end + half height
        x = -R + 2 * R * (torch.arange(n_c, dtype=_F64) + 0.5) / n_c
        xx, yy = torch.meshgrid(x, x, indexing="ij")
        xy = torch.stack([xx, yy], -1).reshape(-1, 2)
        top = torch.cat([xy, torch.full((len(xy), 1), H / 2, dtype=_F64)], 1)
        bot = torch.cat([xy, torch.full((len(xy), 1), -H / 2, dtype=_F64)], 1)
        rc = math.sqrt(2) * R / n_c
        rad = torch.cat(
            [torch.full((len(barrel),), rb, dtype=_F64), torch.full((2 * len(xy),), rc, dtype=_F64)]
        )
        return torch.cat([barrel, top, bot]), rad, {"n_phi": n_phi, "n_z": n_z, "n_c": n_c}

    def _cell_index(self, h: Tensor | tuple[Tensor, Tensor, Tensor], surf: Tensor) -> Tensor:
        """Cell index (N,) of wall points h (N,3) (or components (x, y, z), each (N,)) on surface ``surf``
        (N,): 0 barrel/sphere, 1/2 caps."""
        g = self._grid_meta
        if isinstance(h, tuple):
            if self.height is None:
                h = torch.stack(h, 1)
            else:
                hx, hy, hz = h
        else:
            hx, hy, hz = h.unbind(-1)
        if self.height is None:
            n = g["n"]
            axis = h.abs().argmax(-1)
            major = h.gather(1, axis[:, None])[:, 0]
            face = 2 * axis + (major < 0).long()
            ax1, ax2 = _AX1.to(h.device)[axis], _AX2.to(h.device)[axis]
            am = major.abs().clamp_min(_TINY)
            ia = (4 / math.pi * torch.atan(h.gather(1, ax1[:, None])[:, 0] / am) + 1) * (n / 2)
            ib = (4 / math.pi * torch.atan(h.gather(1, ax2[:, None])[:, 0] / am) + 1) * (n / 2)
            ia, ib = ia.floor().long().clamp(0, n - 1), ib.floor().long().clamp(0, n - 1)
            return (face * n + ia) * n + ib
        n_phi, n_z, n_c = g["n_phi"], g["n_z"], g["n_c"]
        R, H = self.radius, self.height
        if hx.is_floating_point() and n_phi * n_z + 2 * n_c * n_c < 2**24:
            # same per-axis roundings, floor and clamp as below, combined in floating point (exact: the
            # indices are integers below 2^24) and converted to long once; NaN (never for unit directions
            # from inside) maps to cell 0
            ip = torch.atan2(hy, hx)
            ip += math.pi
            ip *= n_phi / (2 * math.pi)
            ip = ip.floor_().clamp_(0, n_phi - 1)
            iz = hz + H / 2
            iz *= n_z / H
            ip *= n_z
            ip += iz.floor_().clamp_(0, n_z - 1)
            ix = hx + R
            ix *= n_c / (2 * R)
            iy = hy + R
            iy *= n_c / (2 * R)
            ix = ix.floor_().clamp_(0, n_c - 1)
            ix *= n_c
            ix += iy.floor_().clamp_(0, n_c - 1)
            ix += (surf == 2).to(ix.dtype) * float(n_c * n_c)  # exact: 0 or n_c^2
            ix += float(n_phi * n_z)
            return select(surf == 0, ip, ix).nan_to_num_(0.0).long()
        ip = ((torch.atan2(hy, hx) + math.pi) * (n_phi / (2 * math.pi))).floor().long().clamp(0, n_phi - 1)
        iz = ((hz + H / 2) * (n_z / H)).floor().long().clamp(0, n_z - 1)
        ix = ((hx + R) * (n_c / (2 * R))).floor().long().clamp(0, n_c - 1)
        iy = ((hy + R) * (n_c / (2 * R))).floor().long().clamp(0, n_c - 1)
        cap = n_phi * n_z + (surf - 1).clamp_min(0) * n_c * n_c + ix * n_c + iy
        return torch.where(surf == 0, ip * n_z + iz, cap)

    def _table(self, device: torch.device) -> Tensor:
        """Padded (C, K) table of candidate PMT indices per wall cell (padding = n_pmts, a null disk).

        PMT j is listed in cell c when |pos_j - centre_c| <= rcell_c + r_j + pad + 2 tol: then every disk
        point q within pad (+tol) of a wall point inside cell c is covered (triangle inequality).
        """
        key = ("table", str(device))
        if key not in self._cache:
            cen, rcell, self._grid_meta = self._cells()
            rcell = rcell * (1 + 1e-6) + self.tol
            reach = rcell.max() + self._rad64.max() + self.pad + 2 * self.tol
            ic, ip = _pairs_within(cen, self._pos64, float(reach))
            bound = rcell[ic] + self._rad64[ip] + self.pad + 2 * self.tol
            ok = (cen[ic] - self._pos64[ip]).norm(dim=-1) <= bound
            ic, ip = ic[ok], ip[ok]
            order = torch.argsort(ic * self.n_pmts + ip)
            ic, ip = ic[order], ip[order]
            counts = torch.bincount(ic, minlength=len(cen))
            K = max(1, int(counts.max()))
            slot = torch.arange(len(ic)) - (torch.cumsum(counts, 0) - counts)[ic]
            table = torch.full((len(cen), K), self.n_pmts, dtype=torch.long)
            table[ic, slot] = ip
            self._cache[key] = table.to(device)
        return self._cache[key]

    def _soa(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Candidate data for the grid path: per-PMT fields (7, P+1) [cx, cy, cz, nx, ny, nz, r^2] (structure
        of arrays, a few hundred kB: cache resident) in the query dtype (r^2 = r * r evaluated in that dtype,
        as the brute-force test does), and the slot-major candidate table (K, C) long (padding = n_pmts, the
        null disk: radius 0, normal 0, never hit). A candidate costs one gather in the (K, C) table, then
        cache-resident gathers of its PMT fields, whatever the number of cells."""
        key = ("soa", dtype, str(device))
        if key not in self._cache:
            table = self._table(device)
            gp, gn, gr = self._geom(dtype, device)
            fields = torch.cat([gp, gn, (gr * gr)[:, None]], 1).t().contiguous()  # (7, P+1)
            self._cache[key] = (fields, table.t().contiguous())
        return self._cache[key]

    def _counts(self, device: torch.device) -> Tensor:
        """Number of real (non-padding) candidate PMTs per wall cell (C,) long."""
        key = ("counts", str(device))
        if key not in self._cache:
            self._cache[key] = (self._table(device) < self.n_pmts).sum(1)
        return self._cache[key]

    def _geom(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """PMT (pos, normal, radius) in the query dtype/device with one null disk appended (radius 0)."""
        key = ("geom", dtype, str(device))
        if key not in self._cache:
            pos = torch.cat([self._pos64, torch.zeros(1, 3, dtype=_F64)])
            nrm = torch.cat([self._nrm64, torch.zeros(1, 3, dtype=_F64)])
            rad = torch.cat([self._rad64, torch.zeros(1, dtype=_F64)])
            self._cache[key] = tuple(x.to(dtype=dtype, device=device) for x in (pos, nrm, rad))
        return self._cache[key]

    @staticmethod
    def _disk_hits(pos: Tensor, dir: Tensor, limit: Tensor, c: Tensor, n: Tensor, r: Tensor) -> Tensor:
        """Ray-disk distances (N,K) [m] (inf where missed) for rays (N,3) and disks c, n (N|1,K,3), r (N|1,K).

        Plane hit t = (c - p).n / (d.n) for front-face incidence d.n < 0; hit if |p + t d - c| <= r and
        0 < t <= limit."""
        dn = (dir[:, None, :] * n).sum(-1)
        t = ((c - pos[:, None, :]) * n).sum(-1) / torch.where(dn < 0, dn, -1.0)
        off = pos[:, None, :] + t[..., None] * dir[:, None, :] - c
        ok = (dn < 0) & (t > 0) & (t <= limit[:, None]) & ((off * off).sum(-1) <= r * r)
        return torch.where(ok, t, math.inf)

    def _nearest_wall_point(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Closest wall point (N,3) and its surface id for points (N,3) inside (float64)."""
        if self.height is None:
            return self.radius * p / p.norm(dim=-1, keepdim=True).clamp_min(_TINY), torch.zeros(
                len(p), dtype=torch.long, device=p.device
            )
        rho = p[:, :2].norm(dim=-1, keepdim=True).clamp_min(_TINY)
        barrel = (self.radius - rho[:, 0]) <= (self.height / 2 - p[:, 2].abs())
        wb = torch.cat([self.radius * p[:, :2] / rho, p[:, 2:]], 1)
        wc = torch.cat([p[:, :2], torch.where(p[:, 2:] >= 0, self.height / 2, -self.height / 2)], 1)
        surf = torch.where(barrel, 0, torch.where(p[:, 2] >= 0, 1, 2))
        return torch.where(barrel[:, None], wb, wc), surf

    def _in_inner(self, x: Tensor | tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """(N,) bool: points (N,3) (or components (x, y, z), each (N,)) strictly deeper than the shell
        depth D (no PMT disk point there)."""
        Ri = self.radius - self.shell
        px, py, pz = x if isinstance(x, tuple) else x.unbind(-1)
        if self.height is None:
            return px * px + py * py + pz * pz < Ri * Ri
        return (px * px + py * py < Ri * Ri) & (pz.abs() < self.height / 2 - self.shell)

    @staticmethod
    def _grid_hits(
        p: Tensor,
        d: Tensor,
        lim: Tensor,
        fields: Tensor,
        slots: Tensor,
        cell: Tensor,
        k0: int,
        k1: int,
        best: Tensor,
        best_dn: Tensor,
        best_j: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest front-face disk hit among candidate slots k0 <= k < k1 of each ray's cell, structure of
        arrays (no autograd), updating the running minimum (best, best_dn, best_j).

        p, d (3, N) ray origins / unit directions, lim (N,) [m], fields (7, P+1) and slots (K, C) from
        :meth:`_soa`, cell (N,) long; best (N,) [m] (inf = none yet), best_dn (N,), best_j (N,) long PMT
        index (n_pmts = none yet). Same arithmetic as :meth:`_disk_hits`: t = (c - p).n / (d.n) for
        d.n < 0, hit if 0 < t <= lim and |p + t d - c|^2 <= r^2. Returns the updated (t (N,) inf = none,
        d.n (N,), PMT index (N,) long).
        """
        px, py, pz = p[0], p[1], p[2]
        dx, dy, dz = d[0], d[1], d[2]
        for k in range(k0, k1):
            j = torch.take(slots[k], cell)
            cx, cy, cz, nx, ny, nz, r2 = (torch.take(fields[i], j) for i in range(7))
            # in-place form of dn = dx nx + dy ny + dz nz, t = ((cx - px) nx + (cy - py) ny + (cz - pz) nz)
            # / dn, q = p + t d - c: the same roundings in the same order (bit-identical), fewer temporaries
            dn = dx * nx
            dn += dy * ny
            dn += dz * nz
            front = dn < 0
            t = cx - px
            t *= nx
            tmp = cy - py
            tmp *= ny
            t += tmp
            tmp = cz - pz
            tmp *= nz
            t += tmp
            t /= select(front, dn, -1.0)
            q2 = None  # 0 + qx^2 == qx^2 exactly: start the sum at the first square
            for pj, dj, cj in ((px, dx, cx), (py, dy, cy), (pz, dz, cz)):
                qj = t * dj
                qj += pj
                qj -= cj
                qj *= qj
                if q2 is None:
                    q2 = qj
                else:
                    q2 += qj
            ok = q2 <= r2
            ok &= front
            ok &= t > 0
            ok &= t <= lim
            ok &= t < best
            best = select(ok, t, best)
            best_dn = select(ok, dn, best_dn)
            best_j = select(ok, j, best_j)
        return best, best_dn, best_j

    def _grid_search(
        self, grid_hits: Any, p: Tensor, d: Tensor, lim: Tensor, fields: Tensor, slots: Tensor, cell: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_grid_hits` over all K slots with nested compaction: slot k is evaluated only for rays
        whose cell lists more than k PMTs (the other rays would meet the null disk there, which is never
        hit). While most of the current rays need slot k the current arrays are used as they are;
        otherwise the running results are written back and the rays that still need slots are gathered
        once (each later compaction shrinks that subset further). Results are identical to the uncompacted
        loop (same per-pair arithmetic, same slot order). Returns (t (N,) [m], d.n (N,), PMT index (N,))."""
        K = slots.shape[0]
        best = torch.full_like(lim, math.inf)
        best_dn = torch.zeros_like(lim)
        best_j = torch.full(lim.shape, self.n_pmts, dtype=torch.long, device=lim.device)
        cnt = self._counts(lim.device).take(cell)
        ix = None  # rows of the full arrays held by the current subset (None: all)
        b, bd, bj = best, best_dn, best_j
        for k in range(K):
            act = cnt > k
            n_act = int(act.sum())
            if n_act == 0:
                break
            if n_act <= 0.7 * cnt.shape[0]:
                if ix is not None:  # write the subset's running results back before shrinking it
                    best.index_copy_(0, ix, b)
                    best_dn.index_copy_(0, ix, bd)
                    best_j.index_copy_(0, ix, bj)
                else:
                    best, best_dn, best_j = b, bd, bj
                i = act.nonzero()[:, 0]
                ix = i if ix is None else ix.index_select(0, i)
                p, d = p.index_select(1, i), d.index_select(1, i)
                lim, cell, cnt = lim.index_select(0, i), cell.index_select(0, i), cnt.index_select(0, i)
                b, bd, bj = b.index_select(0, i), bd.index_select(0, i), bj.index_select(0, i)
            b, bd, bj = grid_hits(p, d, lim, fields, slots, cell, k, k + 1, b, bd, bj)
        if ix is None:
            return b, bd, bj
        best.index_copy_(0, ix, b)
        best_dn.index_copy_(0, ix, bd)
        best_j.index_copy_(0, ix, bj)
        return best, best_dn, best_j

    def _grid_prep(self, pt: Tensor, dtr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Float64 wall geometry of rays given as components pt, dtr (3, N): wall distance t64 (N,) [m], exit
        surface (N,), start_in (N,) bool (start deeper than the PMT shell), fast (N,) bool (the point at
        t64 - pad is inner too) and the exit cell (N,) long. The cell is found from the exit point rounded
        to float32: that moves it by ~1e-7 scale, far below the 2 tol slack of the candidate table."""
        p64, d64 = pt.to(_F64), dtr.to(_F64)
        t64, surf = self._wall_xyz(tuple(p64), tuple(d64))
        start_in = self._in_inner(tuple(p64))
        back = (t64 - self.pad).clamp_min(0)
        fast = self._in_inner(tuple(p64[i] + back * d64[i] for i in range(3)))
        cell = self._cell_index(tuple((p64[i] + t64 * d64[i]).to(torch.float32) for i in range(3)), surf)
        return t64, surf, start_in, fast, cell

    def _first_pmt(
        self,
        pt: Tensor,
        dtr: Tensor,
        limit: Tensor,
        start_in: Tensor,
        fast: Tensor,
        cell_h: Tensor,
        chunk: int = 1 << 17,
        short: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """First PMT disk hit (index (N,) long, n_pmts = none; distance t (N,) [m], inf = none; d.n (N,)),
        exact, grid accelerated (no autograd), for rays given as components pt, dtr (3, N).

        start_in, fast, cell_h from :meth:`_grid_prep`. A ray is handled by the grid when the points at
        t_wall - pad (and, for starts inside the shell, at pad - D) lie in the convex inner volume: then
        the whole stretch between them contains no disk point, and any hit lies within pad of the exit
        point h or of the wall point w under the start, whose cells list every such disk. ``short`` (N,)
        bool marks rays whose wall distance is <= pad (e.g. reflections in a cylinder's cap-barrel
        corner): the whole path, and so every hit q, then lies within pad of h (|q - h| <= t_wall, and
        the limit exceeds t_wall by only 2 tol, covered by the table's slack), so h's cell alone is exact
        wherever the ray starts.
        """
        P = self.n_pmts
        dev, dt = pt.device, pt.dtype
        gp, gn, gr = self._geom(dt, dev)
        fields, slots = self._soa(dt, dev)
        grid_hits = maybe_compiled(Detector._grid_hits, "grid_hits")
        n_all = pt.shape[1]
        if n_all > chunk:
            out = torch.full((n_all,), P, dtype=torch.long, device=dev)
            t_out = torch.full((n_all,), math.inf, dtype=dt, device=dev)
            dn_out = torch.zeros(n_all, dtype=dt, device=dev)
        need = (~start_in).nonzero()[:, 0]  # starts inside the PMT shell (rare)
        if len(need):
            pn, dn_ = pt.index_select(1, need).to(_F64), dtr.index_select(1, need).to(_F64)
            deep = self._in_inner(tuple(pn[i] + (self.pad - self.shell) * dn_[i] for i in range(3)))
            fast[need] &= deep
        if short is not None:
            fast |= short
        for s in range(0, n_all, chunk):
            sl = slice(s, s + chunk)
            cell = cell_h[sl]
            pc, dc = pt[:, sl], dtr[:, sl]
            if compile_enabled():  # contiguous chunks: one compiled graph for every chunk (no stride guards)
                pc, dc = pc.contiguous(), dc.contiguous()
            t, dn, j = self._grid_search(grid_hits, pc, dc, limit[sl], fields, slots, cell)
            if n_all > chunk:
                out[sl], t_out[sl], dn_out[sl] = j, t, dn
            else:  # one chunk: the search's own (fresh) result tensors are the output
                out, t_out, dn_out = j, t, dn
        for s in range(0, len(need), chunk):  # starts inside the PMT shell: also test the start cell
            idx = need[s : s + chunk]
            w, ws = self._nearest_wall_point(pt.index_select(1, idx).t().to(_F64))
            cell = self._cell_index(w, ws)
            pi, di = pt.index_select(1, idx), dtr.index_select(1, idx)
            t, dn, j = self._grid_search(grid_hits, pi, di, limit.index_select(0, idx), fields, slots, cell)
            better = t < t_out.index_select(0, idx)
            sel = idx[better]
            out[sel] = j[better]
            t_out[sel], dn_out[sel] = t[better], dn[better]
        slow = (~fast).nonzero()[:, 0]
        step = max(1, (1 << 22) // max(P, 1))
        for s in range(0, len(slow), step):  # rare rays skimming the wall: test all PMTs
            idx = slow[s : s + step]
            ps, ds = pt.index_select(1, idx).t(), dtr.index_select(1, idx).t()
            t = self._disk_hits(ps, ds, limit[idx], gp[None, :P], gn[None, :P], gr[None, :P])
            tmin, k = t.min(-1)
            hit = torch.isfinite(tmin)
            out[idx] = torch.where(hit, k, P)
            t_out[idx] = tmin
            dn_out[idx] = torch.where(hit, _dot(ds, gn[k]), 0.0)
        self.last_fallback_fraction = len(slow) / max(n_all, 1)
        return out, t_out, dn_out

    def _pmt_core(
        self, pos: Tensor, dir: Tensor, wall_dist: Tensor | None, keep_wall: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """No-grad body of :meth:`pmt_intersect`: (PMT index (N,) long, n_pmts = none; t (N,) [m], inf =
        none; d.n (N,); and, with ``keep_wall``, the float64 wall distance rounded to pos.dtype (N,) and the
        exit surface (N,) long, else None, None)."""
        with torch.no_grad():
            pt, dtr = components(pos), components(dir)  # (3, N) components, transposed once
            self._table(pos.device)  # builds the grid (and its metadata) on first use
            # (not compiled: torch.compile of _grid_prep gave wrong cells/flags for 'sk' with torch 2.13)
            wdd = None if wall_dist is None else wall_dist.detach().to(pos.dtype)
            n_all = pt.shape[1]
            parts: list[tuple[Tensor, ...]] = []
            n_slow = 0.0
            chunk = ray_chunk(pos.device)
            for s in range(0, n_all, chunk):  # cache-sized chunks on CPU, large ones on GPU (see _RAY_CHUNK)
                sl = slice(s, s + chunk)
                pc, dc = pt[:, sl], dtr[:, sl]
                t64, surf, start_in, fast, cell = self._grid_prep(pc, dc)
                t_wall = t64.to(pos.dtype)
                wd = t_wall if wdd is None else torch.minimum(wdd[sl], t_wall + self.tol)
                res = self._first_pmt(
                    pc, dc, wd + self.tol, start_in, fast, cell, chunk=chunk, short=t64 <= self.pad
                )
                parts.append(res + ((t_wall, surf) if keep_wall else ()))
                n_slow += self.last_fallback_fraction * pc.shape[1]
            self.last_fallback_fraction = n_slow / max(n_all, 1)
            if not parts:
                e = pt[0]
                parts = [(e.long(), e, e) + ((e, e.long()) if keep_wall else ())]
            out = [torch.cat(c) if len(parts) > 1 else c[0] for c in zip(*parts, strict=True)]
        return (out[0], out[1], out[2]) + ((out[3], out[4]) if keep_wall else (None, None))

    def wall_pmt_intersect(self, pos: Tensor, dir: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`wall_distance` and :meth:`pmt_intersect` (with wall_dist None) in one pass over the rays
        (the PMT look-up computes the wall geometry in float64 anyway; no autograd).

        pos (N,3) [m], dir (N,3) unit -> (wall distance (N,) [m]: the float64 exit distance rounded to
        pos.dtype, surface id (N,) long as in :meth:`wall_distance`, pmt (N,) long (-1 = none), dist (N,)
        [m] (inf = none), cos_incidence (N,) (0 = none)). The wall distance agrees with
        :meth:`wall_distance` to the rounding of pos.dtype (bit-identical for float64 input)."""
        idx, t_hit, dn_hit, t_wall, surf = self._pmt_core(pos, dir, None, keep_wall=True)
        hit = idx < self.n_pmts
        return t_wall, surf, select(hit, idx, -1), t_hit, select(hit, -dn_hit, 0.0)

    def pmt_intersect(
        self, pos: Tensor, dir: Tensor, wall_dist: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """First PMT photocathode disk hit by rays from ``pos`` (N,3) [m] along unit ``dir`` (N,3).

        A disk (c, n, r) is hit at t = (c - p).n / (d.n) when the ray meets its front face (d.n < 0),
        |p + t d - c| <= r and 0 < t <= wall_dist + tol (wall_dist (N,) [m], default: the wall distance;
        values beyond the wall are clipped to it). Returns pmt (N,) long (-1 = none), dist (N,) [m]
        (inf = none; differentiable in pos/dir) and cos_incidence = -d.n (N,) (0 = none).

        Acceleration (exact): every disk point lies in the shell of depth D next to the wall. A hit q
        lies on the ray's path through that shell; when that path ends at the wall exit point h and is
        shorter than ``pad`` (almost all rays), |q - h| <= pad, so the PMTs listed for h's wall cell
        (all disks within pad of the cell, see ``_table``) contain the answer. Rays that start inside the
        shell also test the cell under their start point. Rays whose whole path to the wall is shorter
        than ``pad`` (e.g. reflections in a cylinder's cap-barrel corner) lie entirely within pad of h and
        use h's cell alone. The rare remaining rays whose shell path is longer (skimming the wall) are
        tested against all PMTs. Both paths use the same ray-disk test; rays are processed in chunks of
        ``ray_chunk(device)`` (per-ray results, independent of the chunking).
        """
        idx, t_hit, dn_hit, _, _ = self._pmt_core(pos, dir, wall_dist)
        hit = idx < self.n_pmts
        pmt = select(hit, idx, -1)
        if not (torch.is_grad_enabled() and (pos.requires_grad or dir.requires_grad)):
            return pmt, t_hit, select(hit, -dn_hit, 0.0)
        gp, gn, _ = self._geom(pos.dtype, pos.device)  # differentiable recomputation of the same formula
        c, n = gp[idx], gn[idx]
        dn = _dot(dir, n)
        t = _dot(c - pos, n) / torch.where(hit, dn, -1.0)
        dist = torch.where(hit, t, math.inf)
        cos = torch.where(hit, -dn, 0.0)
        return pmt, dist, cos


def _wall_area(R: float, H: float | None) -> float:
    """Wall area [m^2] of a sphere (H None) or closed cylinder."""
    return 4 * math.pi * R * R if H is None else 2 * math.pi * R * (R + H)


def _solve_spacing(count, target: int, s_min: float, s_max: float, iters: int = 30) -> float:
    """Grid pitch whose PMT count is closest to ``target`` (bisection; the count falls with the pitch)."""
    lo, hi = max(s_min, 0.7 * s_max), 1.5 * s_max
    if count(lo) < target:
        lo = s_min
        if count(s_min) < target:
            raise ConfigError(
                f"pmt.n_target: got {target}; allowed: <= {count(s_min)} (the densest grid for "
                "this PMT radius)"
            )
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(mid) >= target else (lo, mid)
    return lo if abs(count(lo) - target) <= abs(count(hi) - target) else hi


def preset_names() -> list[str]:
    """Names of the detector presets in configs/detectors/ ('wcte' first)."""
    names = sorted(p.stem for p in (config_dir() / "detectors").glob("*.yaml"))
    return sorted(names, key=lambda s: s != "wcte")


def list_presets() -> list[PresetRow]:
    """One :class:`PresetRow` (name, shape, radius, height, n_pmts, photocoverage) per preset."""
    rows = []
    for name in preset_names():
        d = Detector.load(name)
        rows.append(PresetRow(name, d.shape, d.radius, d.height, d.n_pmts, d.photocoverage))
    return rows
