"""Tests of physics.geometry against independent expectations (closed forms, bisection, brute force)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from physics.config import ConfigError, config_dir
from physics.geometry import Detector, list_presets, select

DATA = Path(__file__).parent / "data" / "geometry"
F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# documented photocoverage ranges (configs/detectors/*.yaml comments and their sources)
COVERAGE = {
    "wcte": (0.15, 0.19),
    "iwcd": (0.13, 0.17),
    "sk": (0.38, 0.42),
    "hk": (0.19, 0.22),
    "juno": (0.73, 0.77),
}


@pytest.fixture(scope="module")
def wcte() -> Detector:
    return Detector.load("wcte", dtype=F64)


@pytest.fixture(scope="module")
def fib_sphere() -> Detector:
    cfg = {
        "name": "fib",
        "shape": "sphere",
        "radius_m": 3.0,
        "pmt": {"layout": "fibonacci", "radius_m": 0.1, "n_target": 1200},
    }
    return Detector.from_config(cfg, dtype=F64)


def _rays(det: Detector, n: int, seed: int, dtype=F64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = det.sample_fiducial(n, g, margin=0.0).to(dtype)
    d = torch.randn(n, 3, generator=g, dtype=dtype)
    return pos.to(device), (d / d.norm(dim=1, keepdim=True)).to(device)


def _brute(
    det: Detector, pos: torch.Tensor, d: torch.Tensor, wd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-PMT ray-disk test written independently, broadcast over (rays, PMTs), no grid."""
    c = det.pmt_pos.to(pos)[None]
    n = det.pmt_normal.to(pos)[None]
    r2 = det.pmt_radius.to(pos)[None] ** 2
    out, dist = [], []
    for s in range(0, len(pos), 512):
        p, u, w = pos[s : s + 512, None], d[s : s + 512, None], wd[s : s + 512, None] + det.tol
        dn = (u * n).sum(-1)
        t = ((c - p) * n).sum(-1) / torch.where(dn < 0, dn, -1.0)
        q = p + t[..., None] * u - c
        ok = (dn < 0) & (t > 0) & (t <= w) & ((q * q).sum(-1) <= r2)
        tm, k = torch.where(ok, t, math.inf).min(1)
        out.append(torch.where(torch.isfinite(tm), k, -1))
        dist.append(tm)
    return torch.cat(out), torch.cat(dist)


# ------------------------------------------------------------------------------------------------
# wall intersection
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wcte", "juno"])
def test_wall_distance_matches_bisection(name: str) -> None:
    det = Detector.load(name)
    pos, d = _rays(det, 1000, 1)
    t, nrm = det.wall_intersect(pos, d)
    # independent bisection on the inside() predicate: inside at lo, outside at hi
    lo, hi = torch.zeros_like(t), torch.full_like(t, 3 * det.scale)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ins = det.inside(pos + mid[:, None] * d)
        lo, hi = torch.where(ins, mid, lo), torch.where(ins, hi, mid)
    assert torch.allclose(t, 0.5 * (lo + hi), atol=1e-12 * 2**10 * det.scale)
    h = pos + t[:, None] * d
    if det.height is None:  # closed form: normal = -h / R
        assert torch.allclose(nrm, -h / det.radius, atol=1e-9)
    else:
        on_cap = (h[:, 2].abs() - det.height / 2).abs() < 1e-9
        expect = torch.where(
            on_cap[:, None],
            torch.stack([0 * t, 0 * t, -torch.sign(h[:, 2])], 1),
            torch.cat([-h[:, :2] / det.radius, 0 * t[:, None]], 1),
        )
        assert torch.allclose(nrm, expect, atol=1e-8)
    assert ((nrm * d).sum(1) < 0).all()  # inward normal faces the incoming ray


def test_wall_axis_parallel_and_perpendicular_rays(wcte: Detector) -> None:
    R, H = wcte.radius, wcte.height
    g = torch.Generator().manual_seed(2)
    pos = wcte.sample_fiducial(500, g, margin=0.1).to(F64)
    up = torch.tensor([[0.0, 0, 1]], dtype=F64).expand(500, 3)
    ang = 2 * math.pi * torch.rand(500, generator=g, dtype=F64)
    flat = torch.stack([torch.cos(ang), torch.sin(ang), 0 * ang], 1)  # in the z = const plane
    p = pos.clone().requires_grad_(True)
    t_up, n_up = wcte.wall_intersect(p, up)
    t_dn, _ = wcte.wall_intersect(p, -up)
    t_fl, n_fl = wcte.wall_intersect(p, flat)
    (t_up.sum() + t_dn.sum() + t_fl.sum()).backward()
    assert torch.isfinite(p.grad).all()
    assert torch.allclose(t_up, H / 2 - pos[:, 2], atol=1e-12)
    assert torch.allclose(t_dn, H / 2 + pos[:, 2], atol=1e-12)
    assert torch.allclose(n_up, torch.tensor([0.0, 0, -1], dtype=F64).expand(500, 3))
    b = (pos[:, :2] * flat[:, :2]).sum(1)  # closed form of |p_xy + t u|^2 = R^2
    assert torch.allclose(t_fl, -b + torch.sqrt(b * b + R * R - (pos[:, :2] ** 2).sum(1)), atol=1e-12)
    assert torch.isfinite(n_fl).all() and torch.allclose(n_fl[:, 2], torch.zeros(500, dtype=F64))
    # on the axis, straight up: barrel never reached, no NaN
    t0, n0 = wcte.wall_intersect(torch.zeros(1, 3, dtype=F64), up[:1])
    assert float(t0) == H / 2 and torch.isfinite(n0).all()


# ------------------------------------------------------------------------------------------------
# PMT look-up
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_rays", [3000, pytest.param(100000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["wcte", "fib"])
def test_grid_lookup_equals_brute_force(
    which: str, device: str, n_rays: int, wcte: Detector, fib_sphere: Detector
) -> None:
    det = wcte if which == "wcte" else fib_sphere
    det.to(device)
    for seed, dtype in ((3, F64), (4, torch.float32)):
        pos, d = _rays(det, n_rays, seed, dtype, device)
        wd, nrm = det.wall_intersect(pos, d)
        # second family: rays leaving the wall (as after a reflection), many start inside the PMT shell
        h = pos + wd[:, None] * d
        d2 = d.roll(1, 0)
        d2 = torch.where(((d2 * nrm).sum(1) < 0)[:, None], -d2, d2)
        wd2, _ = det.wall_intersect(h, d2)
        for p, u, w in ((pos, d, wd), (h, d2, wd2)):
            pm, dist, cos = det.pmt_intersect(p, u, w)
            pb, db = _brute(det, p, u, w)
            assert torch.equal(pm, pb)
            hit = pb >= 0
            assert hit.float().mean() > 0.05
            tol = 1e-9 if dtype == F64 else 1e-4
            assert torch.allclose(dist[hit], db[hit], rtol=tol, atol=tol * det.scale)
            assert torch.isinf(dist[~hit]).all() and (cos[~hit] == 0).all()
            ci = -(u[hit] * det.pmt_normal.to(u)[pb[hit]]).sum(1)
            assert torch.allclose(cos[hit], ci) and (cos[hit] > 0).all()
    det.to("cpu")


@pytest.mark.parametrize("which", ["wcte", "fib"])
def test_one_pass_wall_and_pmt_query_equals_brute_force(
    which: str, wcte: Detector, fib_sphere: Detector
) -> None:
    """wall_pmt_intersect (one pass, as the optics uses it): its wall distance is the float64 exit distance
    rounded to float32 (checked against the float64 wall_distance and independent bisection), its surface
    ids match, and its PMT answer equals the all-PMT brute force up to that wall distance."""
    det = wcte if which == "wcte" else fib_sphere
    pos, d = _rays(det, 3000, 11, torch.float32)
    t, surf, pm, dist, cos = det.wall_pmt_intersect(pos, d)
    t64, s64 = det.wall_distance(pos.double(), d.double())
    assert torch.equal(t, t64.float()) and torch.equal(surf, s64)
    lo, hi = torch.zeros_like(t64), torch.full_like(t64, 3 * det.scale)  # bisection on inside()
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ins = det.inside(pos.double() + mid[:, None] * d.double())
        lo, hi = torch.where(ins, mid, lo), torch.where(ins, hi, mid)
    assert torch.allclose(t.double(), 0.5 * (lo + hi), rtol=1e-6, atol=1e-6 * det.scale)
    pb, db = _brute(det, pos, d, t)
    assert torch.equal(pm, pb) and (pb >= 0).float().mean() > 0.05
    hit = pb >= 0
    assert torch.allclose(dist[hit], db[hit], rtol=1e-4, atol=1e-4 * det.scale)
    assert torch.isinf(dist[~hit]).all() and (cos[~hit] == 0).all() and (cos[hit] > 0).all()


def test_pmt_lookup_independent_of_ray_chunk(wcte: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-up is per ray: chunks of 1000 rays (many chunks, as a CPU run of 1e7 rays has) and one chunk
    of 2^22 (the GPU setting) give bit-identical answers, both against the all-PMT brute force."""
    import physics.geometry as geometry

    pos, d = _rays(wcte, 5000, 12, torch.float32)
    got = []
    for size in (1000, geometry._RAY_CHUNK_GPU):
        monkeypatch.setattr(geometry, "ray_chunk", lambda device, size=size: size)
        got.append(wcte.wall_pmt_intersect(pos, d))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)
    pb, _ = _brute(wcte, pos, d, got[0][0])
    assert torch.equal(got[0][2], pb) and (pb >= 0).float().mean() > 0.05


def test_select_is_bitwise_where() -> None:
    """The CPU integer-mask select copies every value exactly as torch.where does (inf, NaN, -0, ints)."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, F64, torch.int64, torch.int32):
        a, b = (torch.randn(5000, generator=g) * 100).to(dt), (torch.randn(5000, generator=g) * 100).to(dt)
        if dt.is_floating_point:
            a[::7], b[::5], a[::11] = math.inf, math.nan, -0.0
        c = torch.rand(5000, generator=g) < 0.5
        as_bits = (lambda x: x.view(torch.uint8)) if dt.is_floating_point else (lambda x: x)
        assert torch.equal(as_bits(select(c, a, b)), as_bits(torch.where(c, a, b)))
        assert torch.equal(as_bits(select(c, a, -3)), as_bits(torch.where(c, a, -3)))
    m = torch.randn(40, 3, generator=g)
    c = torch.rand(40, generator=g) < 0.5
    assert torch.equal(select(c[:, None], m, -m), torch.where(c[:, None], m, -m))


def test_sphere_hit_fraction_equals_photocoverage() -> None:
    """Uniform isotropic light in a sphere exits uniformly over the wall, so the PMT hit fraction equals the
    photocoverage (disks lie within ~2 mm of the wall, curvature corrections ~ r^2/R^2 ~ 2e-4)."""
    det = Detector.load("juno")
    n = 20000
    pos, d = _rays(det, n, 5, torch.float32)
    pm, _, _ = det.pmt_intersect(pos, d)
    frac, sigma = (pm >= 0).double().mean().item(), math.sqrt(det.photocoverage * (1 - det.photocoverage) / n)
    assert abs(frac - det.photocoverage) < 4 * sigma


def test_mini_table_aimed_rays_and_gradient() -> None:
    det = Detector.load(DATA / "mini.yaml")
    assert det.n_pmts == 7 and det.photocoverage == pytest.approx(
        7 * math.pi * 0.01 / (2 * math.pi * 3), rel=1e-12
    )
    c = det.pmt_pos.to(F64)
    o = torch.tensor([[0.1, -0.2, 0.05]], dtype=F64).expand(7, 3).clone().requires_grad_(True)
    d = (c - o) / (c - o).norm(dim=1, keepdim=True)
    pm, dist, cos = det.pmt_intersect(o, d.detach())
    assert pm.tolist() == list(range(7))
    assert torch.allclose(dist, (c - o).norm(dim=1), atol=1e-12)
    n = det.pmt_normal.to(F64)
    assert torch.allclose(cos, -(d * n).sum(1), atol=1e-12)
    dist.sum().backward()  # closed form: t = (c - p).n / (d.n)  ->  dt/dp = -n / (d.n)
    assert torch.allclose(o.grad, -n / (d * n).sum(1, keepdim=True), atol=1e-12)
    # a ray between the two top-cap PMTs hits nothing and travels to the wall
    pm, dist, _ = det.pmt_intersect(
        torch.tensor([[0.25, 0.0, 0.0]], dtype=F64), torch.tensor([[0.0, 0, 1]], dtype=F64)
    )
    assert int(pm) == -1 and math.isinf(float(dist))


# ------------------------------------------------------------------------------------------------
# presets and layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(COVERAGE))
def test_preset_count_and_photocoverage(name: str) -> None:
    det = Detector.load(name, dtype=F64)
    cfg = yaml.safe_load((config_dir() / "detectors" / f"{name}.yaml").read_text())
    r, target = cfg["pmt"]["radius_m"], cfg["pmt"]["n_target"]
    assert abs(det.n_pmts - target) <= 0.03 * target
    R, H = cfg["radius_m"], cfg.get("height_m")
    area = 4 * math.pi * R**2 if H is None else 2 * math.pi * R * H + 2 * math.pi * R**2
    assert det.photocoverage == pytest.approx(det.n_pmts * math.pi * r**2 / area, rel=1e-9)
    lo, hi = COVERAGE[name]
    assert lo <= det.photocoverage <= hi
    # disks are inscribed: every rim point of every disk is inside the detector
    ang = torch.linspace(0, 2 * math.pi, 13, dtype=F64)[:-1]
    n = det.pmt_normal.to(F64)
    e1 = torch.linalg.cross(
        n,
        torch.where(
            n[:, 2:].abs() < 0.9, torch.tensor([0.0, 0, 1], dtype=F64), torch.tensor([1.0, 0, 0], dtype=F64)
        ),
    )
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(n, e1)
    rim = det.pmt_pos.to(F64)[:, None] + r * (
        torch.cos(ang)[:, None] * e1[:, None] + torch.sin(ang)[:, None] * e2[:, None]
    )
    assert det.inside(rim.reshape(-1, 3) * (1 - 1e-12)).all()


def test_list_presets_rows() -> None:
    rows = {row.name: row for row in list_presets()}
    assert set(COVERAGE) <= set(rows)
    assert rows["sk"].shape == "cylinder" and rows["sk"].radius == 16.9 and rows["sk"].height == 36.2
    assert (
        rows["juno"].height is None
        and COVERAGE["juno"][0] <= rows["juno"].photocoverage <= COVERAGE["juno"][1]
    )


def test_fibonacci_equal_area_density(fib_sphere: Detector) -> None:
    u = -fib_sphere.pmt_normal.to(F64)  # unit position vectors
    n = fib_sphere.n_pmts
    # 20 equal-area zones in z (Archimedes): counts n/20 within 1
    zc = torch.bincount(((u[:, 2] + 1) * 10).floor().long().clamp(0, 19), minlength=20)
    assert (zc - n / 20).abs().max() <= 1
    # 8 x 4 equal-area cells (azimuth sectors x z zones): counts within 5 % of n/32
    phi = torch.atan2(u[:, 1], u[:, 0]) + math.pi
    cell = (phi / (2 * math.pi) * 8).floor().long().clamp(0, 7) * 4 + (
        (u[:, 2] + 1) * 2
    ).floor().long().clamp(0, 3)
    cc = torch.bincount(cell, minlength=32).double()
    assert (cc / (n / 32) - 1).abs().max() < 0.05
    # nearest-neighbour distances: no overlaps and no clusters (min >= 0.6 of the hexagonal spacing)
    d = torch.cdist(fib_sphere.pmt_pos.to(F64), fib_sphere.pmt_pos.to(F64)) + torch.eye(n, dtype=F64) * 1e9
    s_hex = math.sqrt(8 * math.pi * 9.0 / (math.sqrt(3) * n))
    assert d.min() >= 0.6 * s_hex and d.min() >= 2 * 0.1


def test_table_roundtrip_csv_and_hdf5(tmp_path: Path, wcte: Detector) -> None:
    # the detector's pmt tensors are float32: write its float64 master copy
    pos, nrm, rad = wcte._pos64.numpy(), wcte._nrm64.numpy(), wcte._rad64.numpy()
    sub = tmp_path / "tables"
    sub.mkdir()
    np.savetxt(
        sub / "pmts.csv",
        np.column_stack([pos, nrm, rad]),
        delimiter=",",
        header="x,y,z,nx,ny,nz,r",
        comments="",
        fmt="%.17g",
    )
    with h5py.File(sub / "pmts.h5", "w") as f:
        f["pos"], f["normal"], f["radius"] = pos, nrm, rad
    dets = []
    for fname in ("pmts.csv", "pmts.h5"):
        cfg = {
            "name": "t",
            "shape": "cylinder",
            "radius_m": 2.0,
            "height_m": 4.0,
            "pmt": {"layout": "table", "file": f"tables/{fname}"},
        }
        (tmp_path / f"{fname}.yaml").write_text(yaml.safe_dump(cfg))
        dets.append(Detector.load(tmp_path / f"{fname}.yaml"))
    for det in dets:
        assert det.n_pmts == wcte.n_pmts and det.photocoverage == pytest.approx(wcte.photocoverage, rel=1e-12)
        assert torch.equal(det._pos64, wcte._pos64) and torch.equal(det._nrm64, wcte._nrm64)
    assert torch.equal(dets[0]._pos64, dets[1]._pos64) and torch.equal(dets[0]._rad64, dets[1]._rad64)


# ------------------------------------------------------------------------------------------------
# invalid configurations
# ------------------------------------------------------------------------------------------------
def _base() -> dict:
    return {
        "name": "x",
        "shape": "cylinder",
        "radius_m": 1.0,
        "height_m": 2.0,
        "pmt": {"layout": "grid", "radius_m": 0.05, "spacing_m": 0.2},
    }


def _table_cfg(tmp_path: Path, rows: list[list[float]]) -> dict:
    np.savetxt(tmp_path / "p.csv", np.array(rows), delimiter=",", header="x,y,z,nx,ny,nz,r", comments="")
    return {
        "name": "x",
        "shape": "cylinder",
        "radius_m": 1.0,
        "height_m": 2.0,
        "pmt": {"layout": "table", "file": "p.csv"},
    }


BAD = {
    "unknown key": (lambda c: c.update(colour="red"), "colour"),
    "missing key": (lambda c: c.pop("radius_m"), "radius_m"),
    "missing height": (lambda c: c.pop("height_m"), "height_m"),
    "wrong type": (lambda c: c.update(radius_m="two"), "radius_m"),
    "negative radius": (lambda c: c.update(radius_m=-1.0), "radius_m"),
    "zero pmt radius": (lambda c: c["pmt"].update(radius_m=0.0), "pmt.radius_m"),
    "unknown pmt key": (lambda c: c["pmt"].update(colour=1), "colour"),
    "bad layout": (lambda c: c["pmt"].update(layout="hexagon"), "pmt.layout"),
    "layout vs shape": (lambda c: c["pmt"].update(layout="fibonacci"), "pmt.layout"),
    "spacing below 2r": (lambda c: c["pmt"].update(spacing_m=0.09), "pmt.spacing_m"),
    "both count and spacing": (lambda c: c["pmt"].update(n_target=100), "n_target"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_config_raises(case: str) -> None:
    cfg = _base()
    edit, field = BAD[case]
    edit(cfg)
    with pytest.raises(ConfigError, match=field):
        Detector.from_config(cfg)


def test_invalid_tables_raise(tmp_path: Path) -> None:
    ok = [[0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.1], [0.5, 0.0, 1.0, 0.0, 0.0, -1.0, 0.1]]
    Detector.from_config(_table_cfg(tmp_path, ok), base_dir=tmp_path)  # valid
    cases = {
        "pos[1]": [ok[0], [0.5, 0.0, 1.2, 0.0, 0.0, -1.0, 0.1]],  # 20 cm above the top cap
        "overlap": [ok[0], [0.15, 0.0, 1.0, 0.0, 0.0, -1.0, 0.1]],  # centres 15 cm < 20 cm apart
        "normal[1]": [ok[0], [0.5, 0.0, 1.0, 0.0, 0.0, -0.9, 0.1]],  # not a unit vector
        "normal[0]": [[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.1], ok[1]],  # facing out of the detector
        "radius[0]": [[0.0, 0.0, 1.0, 0.0, 0.0, -1.0, -0.1], ok[1]],
    }
    for field, rows in cases.items():
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            Detector.from_config(_table_cfg(tmp_path, rows), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="pmt.file"):
        Detector.from_config(
            {**_table_cfg(tmp_path, ok), "pmt": {"layout": "table", "file": "nope.csv"}}, base_dir=tmp_path
        )


def test_bad_preset_name_lists_presets() -> None:
    with pytest.raises(ConfigError, match="detector") as err:
        Detector.load("superk")
    for name in COVERAGE:
        assert name in str(err.value)


# ------------------------------------------------------------------------------------------------
# fiducial sampling
# ------------------------------------------------------------------------------------------------
def test_sample_fiducial_uniform(wcte: Detector, fib_sphere: Detector) -> None:
    m = 0.5
    p = wcte.sample_fiducial(20000, torch.Generator().manual_seed(7), margin=m).to(F64)
    rho2 = (p[:, :2] ** 2).sum(1)
    assert (rho2 <= (wcte.radius - m) ** 2).all() and (p[:, 2].abs() <= wcte.height / 2 - m).all()
    # uniform volume density: rho^2 uniform on [0, (R-m)^2], z uniform, phi uniform (KS tests)
    assert stats.kstest(rho2.numpy() / (wcte.radius - m) ** 2, "uniform").pvalue > 1e-3
    assert stats.kstest((p[:, 2].numpy() / (wcte.height - 2 * m)) + 0.5, "uniform").pvalue > 1e-3
    phi = (torch.atan2(p[:, 1], p[:, 0]).numpy() + math.pi) / (2 * math.pi)
    assert stats.kstest(phi, "uniform").pvalue > 1e-3
    q = fib_sphere.sample_fiducial(20000, torch.Generator().manual_seed(8), margin=m).to(F64)
    r3 = (q.norm(dim=1) / (fib_sphere.radius - m)) ** 3
    assert (r3 <= 1).all() and stats.kstest(r3.numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest((q[:, 2] / q.norm(dim=1)).numpy() * 0.5 + 0.5, "uniform").pvalue > 1e-3
    again = wcte.sample_fiducial(20000, torch.Generator().manual_seed(7), margin=m).to(F64)
    assert torch.equal(p, again)
    with pytest.raises(ConfigError, match="margin"):
        wcte.sample_fiducial(10, None, margin=2.5)
