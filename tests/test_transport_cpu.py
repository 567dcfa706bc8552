"""Tests of the fused CPU transport kernel (physics/transport_cpu.py, Optics(backend='numba')).

The kernel must be the same physics as the round-by-round tensor transport (Optics(backend='torch')), which
tests/test_optics.py validates against closed forms and Geant4. With independent random streams the two
agree statistically: two-sample chi-square tests of per-PMT counts, hit times, incidence angles and the
direct/indirect split, with every process on (absorption, Rayleigh with polarisation, Mie, diffuse and
specular wall reflection, PMT-glass reflection), in a cylinder (phi-z / cap grid cells) and a sphere
(cube-map cells). The medium table must reproduce the exact coefficients.
"""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from twosample import two_sample_chi2

from physics.config import ConfigError
from physics.geometry import Detector
from physics.medium import Medium
from physics.optics import Optics
from physics.records import Photons

tc = pytest.importorskip("physics.transport_cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def water(abs_m: float = 8.0, ray_m: float = 6.0, mie_m: float | None = 10.0, g: float = 0.8) -> Medium:
    """Repository water with constant absorption and Rayleigh lengths [m] (short, so that every process acts
    in a 2 m detector) and optional Mie (HG asymmetry g)."""
    cfg = copy.deepcopy(Medium.load("water").config)
    cfg["absorption"] = {"model": "constant", "length_m": abs_m}
    cfg["rayleigh"] = {"model": "power_law", "b_per_m": 1.0 / ray_m, "reference_nm": 500.0, "exponent": 0.0}
    if mie_m is None:
        cfg["mie"] = {"enabled": False}
    else:
        cfg["mie"] = {"enabled": True, "length_m": mie_m, "reference_nm": 500.0, "exponent": 0.0, "g": g}
    return Medium(cfg)


def cylinder() -> Detector:
    return Detector.from_config(
        {
            "name": "cyl",
            "shape": "cylinder",
            "radius_m": 1.0,
            "height_m": 2.0,
            "pmt": {"layout": "grid", "radius_m": 0.08, "spacing_m": 0.25},
        }
    )


def sphere() -> Detector:
    return Detector.from_config(
        {
            "name": "sph",
            "shape": "sphere",
            "radius_m": 1.2,
            "pmt": {"layout": "fibonacci", "radius_m": 0.08, "n_target": 250},
        }
    )


def source(n: int, seed: int, centre=(0.2, -0.1, 0.3), dtype=torch.float32) -> Photons:
    """Isotropic point source at ``centre`` [m], wavelengths uniform in 300-600 nm."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    v = (v / v.norm(dim=1, keepdim=True)).to(dtype)
    pos = torch.tensor([centre], dtype=dtype).expand(n, 3).contiguous()
    wl = (300.0 + 300.0 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    return Photons(
        pos=pos, dir=v, t=torch.zeros(n, dtype=dtype), wavelength=wl, event=torch.arange(n) // (n // 4)
    )


def chi2_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of the two-sample chi-square shape test (twosample.two_sample_chi2)."""
    return two_sample_chi2(a, b)[2]


def compare(
    det: Detector,
    med: Medium,
    ph: Photons,
    opt_kw: dict,
    polarization=None,
    parts=("all", "direct", "indirect"),
) -> None:
    runs = {}
    for backend, seed in (("torch", 1), ("numba", 2)):
        opt = Optics(backend=backend, **opt_kw)
        hits = opt.sample(ph, det, med, torch.Generator().manual_seed(seed), polarization=polarization)
        runs[backend] = (hits, dict(opt.last_stats))
    (a, sa), (b, sb) = runs["torch"], runs["numba"]
    n = len(ph)
    assert sa["lost"] == sb["lost"] == 0 and sa["truncated"] == sb["truncated"] == 0
    # totals: hits and photon-steps (binomial / Poisson-like errors of the two samples)
    na, nb = len(a), len(b)
    assert abs(na - nb) < 4.5 * math.sqrt(na + nb), (na, nb)
    assert abs(sa["steps"] - sb["steps"]) < 4.5 * math.sqrt(2 * n * 2.0), (sa["steps"], sb["steps"])
    ia, ib = int(a.indirect.sum()), int(b.indirect.sum())
    assert abs(ia - ib) < 4.5 * math.sqrt(ia + ib), (ia, ib)
    assert ia > 0.1 * na  # the indirect light is a sizeable, tested share
    pmin = 1e-4
    P = det.n_pmts
    for sel in parts:
        ma = slice(None) if sel == "all" else (a.indirect if sel == "indirect" else ~a.indirect)
        mb = slice(None) if sel == "all" else (b.indirect if sel == "indirect" else ~b.indirect)
        pa = torch.bincount(a.pmt[ma], minlength=P).numpy()
        pb = torch.bincount(b.pmt[mb], minlength=P).numpy()
        assert chi2_p(pa, pb) > pmin, ("per-PMT counts", sel)
        ta, tb = a.t[ma].double().numpy(), b.t[mb].double().numpy()
        edges = np.quantile(np.concatenate([ta, tb]), np.linspace(0, 1, 41))
        edges[-1] += 1e-9
        assert chi2_p(np.histogram(ta, edges)[0], np.histogram(tb, edges)[0]) > pmin, ("time", sel)
        ca, cb = a.cos_incidence[ma].double().numpy(), b.cos_incidence[mb].double().numpy()
        e = np.linspace(0, 1, 21)
        assert chi2_p(np.histogram(ca, e)[0], np.histogram(cb, e)[0]) > pmin, ("cos incidence", sel)
    # per-event bookkeeping and order
    assert torch.equal(torch.bincount(b.event, minlength=4) > 0, torch.ones(4, dtype=torch.bool))
    assert bool((b.event[1:] >= b.event[:-1]).all())
    assert b.t.dtype == ph.t.dtype and b.cos_incidence.dtype == ph.t.dtype
    assert float(b.cos_incidence.min()) > 0 and float(b.cos_incidence.max()) <= 1 + 1e-6


@pytest.mark.parametrize("make_det", [cylinder, sphere], ids=["cylinder", "sphere"])
def test_numba_matches_torch_all_processes(make_det):
    det = make_det()
    compare(
        det,
        water(),
        source(200_000, 3),
        dict(wall_reflectivity=0.4, diffuse_fraction=0.5, pmt_reflectivity=0.25),
    )


def test_numba_matches_torch_polarised_rayleigh():
    """A beam along z, linearly polarised along x, Rayleigh only: the dipole pattern sends the scattered light
    preferentially along y; the per-PMT pattern of the scattered light of both backends must agree (the
    direct light is one spot), and it must show the dipole asymmetry: more scattered hits on the barrel
    towards +-y than towards +-x."""
    det = cylinder()
    n = 200_000
    ph = source(n, 4, centre=(0.0, 0.0, -0.9))
    ph = Photons(
        pos=ph.pos,
        dir=torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3).contiguous(),
        t=ph.t,
        wavelength=ph.wavelength,
        event=ph.event,
    )
    pol = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    med = water(abs_m=1e9, ray_m=1.5, mie_m=None)
    compare(
        det, med, ph, dict(wall_reflectivity=0.0, pmt_reflectivity=0.0), polarization=pol, parts=("indirect",)
    )
    hits = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0, backend="numba").sample(
        ph, det, med, torch.Generator().manual_seed(9), polarization=pol
    )
    p = det.pmt_pos[hits.pmt[hits.indirect]].double()
    barrel = p[:, 2].abs() < 0.9
    along_y = (p[barrel, 1].abs() > p[barrel, 0].abs()).double().mean()
    assert float(along_y) > 0.55, float(along_y)


def test_reproducible_and_thread_independent():
    det = cylinder()
    ph = source(50_000, 5)
    med = water()
    out = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        opt = Optics(wall_reflectivity=0.4, pmt_reflectivity=0.2, backend="numba", chunk_size=20_000)
        out.append(opt.sample(ph, det, med, torch.Generator().manual_seed(7)))
    torch.set_num_threads(1)
    for h in out[1:]:
        assert torch.equal(h.pmt, out[0].pmt) and torch.equal(h.t, out[0].t)
        assert torch.equal(h.indirect, out[0].indirect) and torch.equal(h.event, out[0].event)
    other = Optics(wall_reflectivity=0.4, pmt_reflectivity=0.2, backend="numba").sample(
        ph, det, med, torch.Generator().manual_seed(8)
    )
    assert not (len(other) == len(out[0]) and torch.equal(other.pmt, out[0].pmt))


def test_medium_table_reproduces_coefficients():
    """Kernel coefficients from the table vs the exact ones of Optics.init_state: the piecewise-linear
    absorption table exactly (its knots are grid nodes), the smooth laws to < 1e-7 relative."""
    cfg = copy.deepcopy(Medium.load("water").config)
    cfg["mie"] = {"enabled": True, "length_m": 30.0, "reference_nm": 500.0, "exponent": -1.0, "g": 0.9}
    med = Medium(cfg)
    lo, inv_h, tab = tc.medium_table(med, 300.0, 600.0)
    knots = med.interpolation_knots().numpy()
    x = (knots - lo) * inv_h
    assert np.allclose(x, np.round(x), atol=1e-6)  # knots on nodes
    wl = torch.cat([torch.linspace(300.0, 600.0, 3001, dtype=torch.float64), torch.from_numpy(knots)])
    n = len(wl)
    ph = Photons(
        pos=torch.zeros(n, 3, dtype=torch.float64),
        dir=torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3),
        t=torch.zeros(n, dtype=torch.float64),
        wavelength=wl,
        event=torch.zeros(n, dtype=torch.long),
    )
    st = Optics().init_state(ph, med, torch.Generator().manual_seed(0))
    got = np.array([tc._coefficients(float(w), lo, inv_h, tab) for w in wl])
    exact = np.stack([st.inv_mu.numpy(), st.p_abs.numpy(), st.p_ray.numpy(), st.inv_v.numpy()], 1)
    rel = np.abs(got / exact - 1)
    assert rel.max() < 1e-7, rel.max(0)
    # absorption alone: exact at every wavelength (linear between the same knots)
    mu_a = tab[:, 0]
    k = np.clip(np.floor((wl.numpy() - lo) * inv_h).astype(int), 0, len(mu_a) - 2)
    f = (wl.numpy() - lo) * inv_h - k
    interp = mu_a[k] + f * (mu_a[k + 1] - mu_a[k])
    exact_a = 1.0 / med.absorption_length(wl).detach().numpy()
    assert np.abs(interp / exact_a - 1).max() < 1e-12


def test_medium_table_follows_calibrated_scales():
    """Optics reuses the kernel's medium table between chunks, and rebuilds it when a calibration changes the
    medium in place: doubling abs_scale (absorption length = abs_scale / a) halves the tabulated mu_abs, and
    the transport then sees it (fewer photons absorbed in the volume)."""
    med = water(abs_m=3.0, ray_m=1e6, mie_m=None)
    det = Detector.load("wcte")
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0, chunk_size=2000, backend="numba")
    n = 4000
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    ph = Photons(
        pos=torch.zeros(n, 3, dtype=torch.float64),
        dir=d / d.norm(dim=1, keepdim=True),
        t=zero,
        wavelength=zero + 400.0,
        event=torch.zeros(n, dtype=torch.long),
    )
    hits1 = len(opt.sample(ph, det, med, gen))
    tab1 = opt._medium_tab[1]
    assert opt._kernel_medium_table(tc, med, ph.wavelength) is tab1  # reused, not rebuilt
    with torch.no_grad():
        med.abs_scale.mul_(2.0)
    hits2 = len(opt.sample(ph, det, med, gen))
    tab2 = opt._medium_tab[1]
    assert tab2 is not tab1
    np.testing.assert_allclose(tab2[2][:, 0], 0.5 * tab1[2][:, 0], rtol=1e-12)
    # survival to the wall exp(-r / L) with r ~ 2-3 m: L 3 -> 6 m raises the hit count by ~1.5x
    assert hits2 > 1.3 * hits1, (hits1, hits2)


def test_edge_rays_axis_parallel_and_in_plane():
    """Rays along +-z (parallel to the barrel), in z = const planes and from the centre: nothing lost, the
    direct hits land where the closed-form geometry says (a +z ray from the axis hits the top-cap PMT on the
    axis when there is one, at t = (H/2 - z0) n_g / c)."""
    det = cylinder()
    med = water(abs_m=1e9, ray_m=1e9, mie_m=None)
    dirs = torch.tensor(
        [
            [0.0, 0.0, 1.0],
            [0.0, 0.0, -1.0],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [math.sqrt(0.5), math.sqrt(0.5), 0.0],
        ],
        dtype=torch.float64,
    )
    n = len(dirs)
    ph = Photons(
        pos=torch.zeros(n, 3, dtype=torch.float64),
        dir=dirs,
        t=torch.zeros(n, dtype=torch.float64),
        wavelength=torch.full((n,), 400.0, dtype=torch.float64),
        event=torch.arange(n),
    )
    for backend in ("torch", "numba"):
        opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0, backend=backend)
        hits = opt.sample(ph, det, med, torch.Generator().manual_seed(0))
        assert opt.last_stats["lost"] == 0 and opt.last_stats["truncated"] == 0
        if backend == "torch":
            ref = hits
    assert torch.equal(hits.event, ref.event) and torch.equal(hits.pmt, ref.pmt)
    assert torch.allclose(hits.t, ref.t, rtol=1e-9) and torch.allclose(hits.cos_incidence, ref.cos_incidence)


def test_backend_choice_errors():
    with pytest.raises(ConfigError, match="backend"):
        Optics(backend="cuda")
    det, med = cylinder(), water()
    ph = source(100, 6)
    with pytest.raises(ConfigError, match="backend: got 'numba'"):
        Optics(backend="numba").sample(ph, det, med, torch.Generator().manual_seed(0), record_wall=True)
    with pytest.raises(ConfigError, match="polarization"):
        Optics(backend="numba").sample(
            ph, det, med, torch.Generator().manual_seed(0), polarization=torch.zeros(3, 3)
        )


def test_concurrent_calls_from_threads():
    """Two Python threads transporting at once (the workqueue layer would abort on a concurrent launch):
    both finish, each with the result of the same call made alone."""
    det, med = cylinder(), water()
    ph = source(20_000, 11)
    solo = Optics(wall_reflectivity=0.3, backend="numba").sample(
        ph, det, med, torch.Generator().manual_seed(3)
    )
    results: list = [None, None]

    def work(i: int) -> None:
        results[i] = Optics(wall_reflectivity=0.3, backend="numba").sample(
            ph, det, med, torch.Generator().manual_seed(3)
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r is not None and torch.equal(r.pmt, solo.pmt) and torch.equal(r.t, solo.t)


@pytest.mark.parametrize("make_det", [cylinder, sphere], ids=["cylinder", "sphere"])
def test_outside_photons_dropped_and_counted(make_det):
    """Photons starting outside (beyond the barrel, beyond a cap, far away) are not transported and are
    counted in last_stats['outside'], by both backends alike; a photon on the wall counts as inside."""
    det = make_det()
    ph = source(1000, 12, centre=(0.0, 0.0, 0.0), dtype=torch.float64)
    pos = ph.pos.clone()
    pos[:3] = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1e6, 1e6, 1e6]], dtype=torch.float64)
    pos[3] = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64) * (det.radius if det.height is None else 1.0)
    ph = Photons(pos=pos, dir=ph.dir, t=ph.t, wavelength=ph.wavelength, event=torch.arange(1000))
    for backend in ("torch", "numba"):
        opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0, backend=backend)
        hits = opt.sample(ph, det, water(), torch.Generator().manual_seed(1))
        assert opt.last_stats["outside"] == 3, backend
        assert not bool((hits.event < 3).any())
        assert opt.last_stats["lost"] == 0


def test_round_cap_truncates_like_the_tensor_transport():
    """No volume interactions, walls and glass reflecting with probability 0.6, a cap of 3 rounds: every
    round ends on a surface, so a photon is alive after the cap with probability 0.6^3 = 0.216; those are
    dropped and counted as truncated, with at most 3 steps per photon. Both backends agree with 0.216 and
    with each other (binomial errors)."""
    det = sphere()
    n = 20_000
    ph = source(n, 13, dtype=torch.float64)
    med = water(abs_m=1e9, ray_m=1e9, mie_m=None)
    p = 0.6**3
    for backend in ("torch", "numba"):
        opt = Optics(
            wall_reflectivity=0.6, diffuse_fraction=0.5, pmt_reflectivity=0.6, max_rounds=3, backend=backend
        )
        opt.sample(ph, det, med, torch.Generator().manual_seed(2))
        st = opt.last_stats
        assert st["rounds"] == 3 and st["lost"] == 0 and st["steps"] <= 3 * n
        assert abs(st["truncated"] - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (backend, st)
        # steps per photon: 1, 2 or 3 with probabilities 0.4, 0.24, 0.36: mean 1.96, variance 0.7584
        assert abs(st["steps"] - n * 1.96) < 4.5 * math.sqrt(n * 0.7584), (backend, st)
