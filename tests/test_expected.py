"""Expected direct-light response (physics.expected via fitting.response.PhysicsResponse).

Independent expectations: closed-form sphere result, numerical disk integration, and the Monte-Carlo mean
of the simulator (physics.emission + physics.optics + physics.sensors), direct photons only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from detectors import small_cylinder as _cyl

from fitting.response import PhysicsResponse
from fitting.uncertainty import kink_modes
from physics import emission
from physics.config import ConfigError
from physics.constants import C_M_PER_NS, MUON_MASS
from physics.expected import disk_solid_angle, wall_exit_distance
from physics.geometry import Detector
from physics.medium import Medium
from physics.optics import Optics
from physics.sensors import PMTResponse

F64 = torch.float64


def _sphere_ring(radius: float, pmt_radius: float, n: int) -> Detector:
    """n PMTs on the equator of a sphere (all at the same distance from the centre)."""
    phi = torch.arange(n, dtype=F64) * 2 * math.pi / n
    u = torch.stack([torch.cos(phi), torch.sin(phi), torch.zeros_like(phi)], 1)
    rc = math.sqrt(radius**2 - pmt_radius**2)
    return Detector("ring", "sphere", radius, None, rc * u, -u, torch.full((n,), pmt_radius, dtype=F64)).to(
        dtype=F64
    )


def _mc_direct(photons, det, med, sen, opt, n_events, gen):
    """MC mean of detected direct p.e. per event and PMT (detection probability as weight)."""
    ch = opt.sample(photons, det, med, gen)
    d = ch.select(~ch.indirect)
    w = sen.detection_probability(d.wavelength.double(), d.cos_incidence.double(), d.pmt).detach()
    p = det.n_pmts
    pe = torch.zeros(n_events * p, dtype=F64).index_add(0, d.event * p + d.pmt, w).view(n_events, p)
    tw = torch.zeros(p, dtype=F64).index_add(0, d.pmt, w * d.t.double())
    tw2 = torch.zeros(p, dtype=F64).index_add(0, d.pmt, w * d.t.double() ** 2)
    sw = pe.sum(0).clamp_min(1e-30)
    t_mean = tw / sw
    t_var = tw2 / sw - t_mean**2
    sw2 = torch.zeros(p, dtype=F64).index_add(0, d.pmt, w * w)
    n_eff = sw**2 / sw2.clamp_min(1e-30)
    return pe, t_mean, t_var, n_eff, sw2


# --------------------------------------------------------------------------------------------------------
def test_disk_solid_angle_matches_numerical_integration():
    """Omega vs brute-force integral of cos/r^2 over the disk (second independent method)."""
    a = 0.1
    n = 800
    r = np.sqrt((np.arange(n) + 0.5) / n) * a
    ph = 2 * np.pi * (np.arange(n) + 0.5) / n
    rr, pp = np.meshgrid(r, ph)
    x, y = rr * np.cos(pp), rr * np.sin(pp)
    for d in (0.5, 1.0, 3.0):
        for th in (0.0, 30.0, 60.0, 80.0):
            t = math.radians(th)
            src = np.array([d * math.sin(t), 0.0, d * math.cos(t)])
            dist = np.sqrt((src[0] - x) ** 2 + (src[1] - y) ** 2 + src[2] ** 2)
            exact = float((src[2] / dist**3).mean() * math.pi * a * a)
            got = float(
                disk_solid_angle(
                    torch.tensor(d, dtype=F64),
                    torch.tensor(math.cos(t), dtype=F64),
                    torch.tensor(a, dtype=F64),
                )
            )
            tol = 3e-3 if d / a >= 10 else 6e-3  # O((a/d)^4) remainder
            assert got == pytest.approx(exact, rel=tol), (d, th, got, exact)


def test_wall_exit_distance_matches_detector():
    det = _cyl(2.0, 4.0, 0.1, 0.6)
    g = torch.Generator().manual_seed(3)
    p = det.sample_fiducial(200, g, margin=0.1).double()
    d = torch.randn(200, 3, generator=g, dtype=F64)
    d = torch.cat([d, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=F64)])
    p = torch.cat([p, torch.zeros(3, 3, dtype=F64)])
    d = d / d.norm(dim=1, keepdim=True)
    ours = wall_exit_distance(p, d, "cylinder", 2.0, 4.0)
    ref, _ = det.wall_intersect(p, d)
    assert torch.allclose(ours, ref.double(), rtol=1e-9, atol=1e-9)


def test_isotropic_source_closed_form_sphere():
    """Source at the centre of a sphere: mu = N QE CE Omega/(4 pi) exp(-R/L),
    Omega = 2 pi (1 - R/sqrt(R^2+a^2)) -> N QE CE a^2/(4 R^2) exp(-R/L) for a << R; time R n_g / c."""
    radius, a = 3.0, 0.1
    det = _sphere_ring(radius, a, 12)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=12)
    resp = PhysicsResponse(det, med, sen, "isotropic", source_wavelength=420.0)
    n = 1.0e7
    out = resp.expected(
        {
            "vertex": torch.zeros(1, 3, dtype=F64),
            "n_photons": torch.tensor([n], dtype=F64),
            "t0": torch.tensor([5.0], dtype=F64),
        }
    )
    wl = torch.tensor([420.0], dtype=F64)
    lat = float(med.attenuation_length(wl).detach())
    qe = float(sen.quantum_efficiency(wl)) * sen.collection_efficiency
    d = math.sqrt(radius**2 - a**2)
    exact = n * qe * 0.5 * (1 - d / math.sqrt(d * d + a * a)) * math.exp(-d / lat)
    small = n * qe * a * a / (4 * radius**2) * math.exp(-radius / lat)
    mu = out["mu"][0].detach()
    assert torch.allclose(mu, torch.full_like(mu, exact), rtol=1e-10)
    assert float(mu[0]) == pytest.approx(small, rel=2 * (a / radius) ** 2)
    # mean path to the disk, averaged over its area with the flux weight 1/r^3: d + a^2/(4 d) (on axis)
    t_exp = 5.0 + (d + a * a / (4 * d)) * float(med.group_index(wl)) / C_M_PER_NS
    assert torch.allclose(out["t_mean"][0].detach(), torch.full_like(mu, t_exp), rtol=0, atol=1e-9)


def _iso_mc_check(scattering: bool, n_ev: int = 8, n_ph: int = 150_000, min_pmts: int = 30):
    det = _cyl(1.5, 3.0, 0.12, 0.5)
    med = Medium.load("water")
    if not scattering:
        with torch.no_grad():
            med.rayleigh_scale.fill_(1e9)
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.1)
    gen = torch.Generator().manual_seed(11)
    vtx = [0.4, -0.3, 0.6]
    ph = emission.isotropic_source(torch.tensor([vtx] * n_ev), n_ph, gen, wavelength=405.0)
    pe, t_mc, v_mc, n_eff, sw2 = _mc_direct(ph, det, med, sen, opt, n_ev, gen)
    resp = PhysicsResponse(det, med, sen, "isotropic", opt, source_wavelength=405.0)
    out = resp.expected(
        {"vertex": torch.tensor([vtx], dtype=F64), "n_photons": torch.tensor([n_ph], dtype=F64)}
    )
    mu = out["mu"][0].detach()
    mc, tot = pe.mean(0), pe.sum(1)
    tot_err = math.sqrt(float(sw2.sum())) / n_ev  # independent photons: Poisson error of the weighted sum
    assert abs(float(mu.sum()) - float(tot.mean())) < max(0.01 * float(tot.mean()), 2.5 * tot_err)
    sel = mc > 20
    assert int(sel.sum()) >= min_pmts
    err = sw2.sqrt() / n_ev
    ok = ((mu - mc).abs() < torch.maximum(0.03 * mc, 2 * err))[sel]
    assert float(ok.float().mean()) >= 0.9  # 2 sigma: ~5% may fail by chance
    assert float(((mu - mc).abs() / err)[sel].max()) < 4.5
    # mean direct-light time (no TTS): within 3 statistical sigma (sqrt(Var/n_eff)) + 10 ps
    dt = (out["t_mean"][0].detach() - t_mc)[sel]
    terr = torch.sqrt(v_mc / n_eff)[sel]
    assert bool((dt.abs() < 3 * terr + 0.01).all())


def test_isotropic_source_vs_mc_quick():
    """Default-run version (fewer photons, same statistical criteria)."""
    _iso_mc_check(scattering=True, n_ev=2, n_ph=100_000, min_pmts=20)


@pytest.mark.slow
def test_isotropic_source_vs_mc_scattering_on():
    _iso_mc_check(scattering=True)


@pytest.mark.slow
def test_isotropic_source_vs_mc_scattering_off():
    _iso_mc_check(scattering=False)


@pytest.mark.slow
def test_muon_vs_mc():
    """Direct light of a 500 MeV muon (black wall, Rayleigh on, absorption on) vs the MC mean of 80 events."""
    det = _cyl(2.0, 4.0, 0.15, 0.6)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.1)
    gen = torch.Generator().manual_seed(5)
    vtx = torch.tensor([[0.0, 0.3, -1.2]])
    d = torch.tensor([[0.0, 0.2, 1.0]])
    d = d / d.norm()
    n_ev, energy = 80, 500.0
    thin = sen.max_detection_probability()
    steps = emission.track_steps("mu-", energy, vtx.expand(n_ev, 3), d.expand(n_ev, 3), med, gen)
    ph = emission.cherenkov_photons(steps, med, gen, thin=thin, chunk_photons=200_000)
    pe, t_mc, v_mc, n_eff, _ = _mc_direct(ph, det, med, sen, opt, n_ev, gen)
    pe = pe / thin
    resp = PhysicsResponse(det, med, sen, "mu-", opt)
    out = resp.expected(
        {"vertex": vtx.double(), "direction": d.double(), "energy": torch.tensor([energy], dtype=F64)}
    )
    mu = out["mu"][0].detach()
    mc, tot = pe.mean(0), pe.sum(1)
    tot_err = float(tot.std() / math.sqrt(n_ev))
    assert abs(float(mu.sum()) - float(tot.mean())) < max(0.01 * float(tot.mean()), 2.5 * tot_err)
    sel = mc > 20
    assert int(sel.sum()) >= 30
    err = pe.std(0) / math.sqrt(n_ev)  # event-to-event spread (includes multiple scattering of the muon)
    pull = ((mu - mc) / err)[sel]
    ok = ((mu - mc).abs() < torch.maximum(0.03 * mc, 2 * err))[sel]
    assert float(ok.float().mean()) >= 0.85
    assert float(pull.abs().max()) < 4.5
    assert float((pull**2).mean()) < 2.0  # chi2 / ndf
    # spread: within a factor 2.2 of the MC time variance (Gaussian summary of a skewed shape)
    ratio = (out["t_var"][0].detach() / v_mc)[sel]
    # mean direct-light time: the MC error sqrt(Var/n_eff) ignores the event-to-event correlation from
    # multiple scattering, so the bound is absolute: 100 ps (~13% of the 3-inch PMT TTS), 40 ps on average
    dt = (out["t_mean"][0].detach() - t_mc)[sel]
    print(
        f"muon: total exp {float(mu.sum()):.2f} mc {float(tot.mean()):.2f} +- {tot_err:.2f}; "
        f"{int(sel.sum())} PMTs > 20 pe, chi2/ndf {float((pull**2).mean()):.2f}, max|pull| "
        f"{float(pull.abs().max()):.2f}, frac ok {float(ok.float().mean()):.2f}, max|dt| "
        f"{float(dt.abs().max()):.3f} mean|dt| {float(dt.abs().mean()):.3f} ns, "
        f"t_var ratio [{float(ratio.min()):.2f}, {float(ratio.max()):.2f}]"
    )
    assert float(dt.abs().max()) < 0.1 and float(dt.abs().mean()) < 0.04
    assert float(ratio.min()) > 1 / 2.2 and float(ratio.max()) < 2.2


# --------------------------------------------------------------------------------------------------------
def _small():
    det = _cyl(1.0, 2.0, 0.08, 0.7)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.1)
    return det, med, sen, opt


def test_small_detector_size():
    det, *_ = _small()
    assert 20 <= det.n_pmts <= 80


def _gradcheck_event_parameters(particle: str, **nodes) -> bool:
    """float64 gradcheck of mu, t_mean, t_var w.r.t. vertex, direction, energy and t0 (small detector)."""
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, particle, opt, **nodes)

    def f(v, d, e, t0):
        o = resp.expected({"vertex": v, "direction": d, "energy": e, "t0": t0})
        return o["mu"], o["t_mean"], o["t_var"]

    v = torch.tensor([[0.1, -0.2, -0.3]], dtype=F64, requires_grad=True)
    d = torch.tensor([[0.3, 0.1, 0.9]], dtype=F64, requires_grad=True)
    e = torch.tensor([300.0], dtype=F64, requires_grad=True)
    t0 = torch.tensor([1.5], dtype=F64, requires_grad=True)
    return torch.autograd.gradcheck(f, (v, d, e, t0), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_event_parameters():
    assert _gradcheck_event_parameters("mu-", n_track_nodes=24)


def test_gradcheck_isotropic_source():
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "isotropic", opt)  # band spectrum

    def f(v, n, t0):
        o = resp.expected({"vertex": v, "n_photons": n, "t0": t0})
        return o["mu"], o["t_mean"], o["t_var"]

    v = torch.tensor([[0.2, -0.1, 0.4]], dtype=F64, requires_grad=True)
    n = torch.tensor([1e4], dtype=F64, requires_grad=True)
    t0 = torch.tensor([0.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (v, n, t0), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_detector_parameters():
    det, med, sen, opt = _small()
    med.double()
    sen.double()
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=24)
    ev = {
        "vertex": torch.tensor([[0.1, -0.2, -0.3]], dtype=F64),
        "direction": torch.tensor([[0.3, 0.1, 0.9]], dtype=F64),
        "energy": torch.tensor([300.0], dtype=F64),
    }

    def f(abs_s, ray_s, qe, toff, rp):
        params = {
            "medium.abs_scale": abs_s,
            "medium.rayleigh_scale": ray_s,
            "sensors.qe_scale": qe,
            "sensors.time_offset": toff,
            "optics.pmt_reflectivity": rp,
        }
        o = torch.func.functional_call(resp, params, (ev,))
        return o["mu"], o["t_mean"]

    p = det.n_pmts
    args = (
        torch.tensor(1.0, dtype=F64, requires_grad=True),
        torch.tensor(1.0, dtype=F64, requires_grad=True),
        torch.linspace(0.9, 1.1, p, dtype=F64).requires_grad_(),
        torch.linspace(-1, 1, p, dtype=F64).requires_grad_(),
        torch.tensor(0.1, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def _node_threshold(resp, med) -> float:
    """Cherenkov threshold [MeV] of the bluest wavelength node (where the quadrature starts to radiate)."""
    wl, _ = resp._wavelength_nodes(F64, "cpu")
    n_max = float(med.refractive_index(wl).max())
    assert n_max <= med.n_max
    return MUON_MASS * (1 / math.sqrt(1 - 1 / n_max**2) - 1)


@pytest.mark.parametrize(
    "case", ["axis_parallel", "near_wall", "near_threshold", "below_threshold", "outward_at_wall"]
)
def test_edges_finite_gradients(case):
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=32)
    t_thr = _node_threshold(resp, med)
    v, d, e = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], 400.0
    if case == "near_wall":
        v, d = [0.97, 0.0, 0.2], [0.6, 0.0, 0.8]
    elif case == "near_threshold":
        e = t_thr + 0.05
    elif case == "below_threshold":
        e = t_thr - 1.0
    elif case == "outward_at_wall":
        v, d = [0.0, 0.0, 0.999], [0.0, 0.0, 1.0]
    v = torch.tensor([v], dtype=F64, requires_grad=True)
    d = torch.tensor([d], dtype=F64, requires_grad=True)
    e = torch.tensor([e], dtype=F64, requires_grad=True)
    t0 = torch.zeros(1, dtype=F64, requires_grad=True)
    out = resp.expected({"vertex": v, "direction": d, "energy": e, "t0": t0})
    loss = out["mu"].sum() + (out["t_mean"] * out["mu"]).sum() + (out["t_var"] * out["mu"]).sum()
    loss.backward()
    for x in (v, d, e, t0):
        assert torch.isfinite(x.grad).all(), case
    assert torch.isfinite(out["mu"]).all() and torch.isfinite(out["t_mean"]).all()
    if case == "below_threshold":
        assert float(out["mu"].sum()) == 0.0
    if case == "near_threshold":  # mu -> 0 continuously: ~ (E - T_thr)^2
        assert 0.0 < float(out["mu"].sum()) < 1e-2


def test_mu_continuous_through_threshold():
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=32)
    t_thr = _node_threshold(resp, med)
    es = torch.tensor([t_thr + 0.5, t_thr + 1.0, t_thr + 2.0], dtype=F64)
    out = resp.expected(
        {
            "vertex": torch.zeros(3, 3, dtype=F64),
            "direction": torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=F64),
            "energy": es,
        }
    )
    tot = out["mu"].sum(1).detach()
    # quadratic onset: doubling (E - T_thr) multiplies mu by ~4 (track length and sin^2 both linear)
    assert 2.5 < float(tot[1] / tot[0]) < 5.0 and 2.5 < float(tot[2] / tot[1]) < 5.0


def test_bad_event_parameters_raise():
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "mu-", opt)
    good = {
        "vertex": torch.zeros(1, 3),
        "direction": torch.tensor([[0.0, 0.0, 1.0]]),
        "energy": torch.tensor([1.0]),
    }
    with pytest.raises(ConfigError, match="energy"):
        resp.expected({**good, "energy": torch.tensor([float("nan")])})
    with pytest.raises(ConfigError, match="direction"):
        resp.expected({**good, "direction": torch.zeros(1, 3)})
    with pytest.raises(ConfigError, match="missing"):
        resp.expected({"vertex": torch.zeros(1, 3)})
    with pytest.raises(ConfigError, match="particle"):
        PhysicsResponse(det, med, sen, "tau-")


# --------------------------------------------------------------------------------------------------------
def _shower_mc_check(n_ev: int, particle: str = "e-", thr_pe: float = 2.0) -> dict[str, float]:
    """500 MeV cascade in WCTE, direct light (black wall, Rayleigh + absorption on) vs the MC mean.

    PMTs within 0.3 m of the point where the cascade axis meets the wall are excluded from the per-PMT
    comparison (known limitation: the depth quadrature under-resolves emission right next to a PMT)."""
    det = Detector.load("wcte").to(dtype=F64)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.1)
    gen = torch.Generator().manual_seed(7)
    vtx = torch.tensor([[0.2, -0.1, -0.8]])
    d = torch.tensor([[0.3, 0.1, 1.0]])
    d = d / d.norm()
    energy = 500.0
    thin = sen.max_detection_probability()
    ph = emission.shower_photons(
        particle, energy, vtx.expand(n_ev, 3), d.expand(n_ev, 3), med, gen, thin=thin
    )
    pe, t_mc, v_mc, n_eff, _ = _mc_direct(ph, det, med, sen, opt, n_ev, gen)
    pe = pe / thin
    resp = PhysicsResponse(det, med, sen, particle, opt)
    out = resp.expected(
        {"vertex": vtx.double(), "direction": d.double(), "energy": torch.tensor([energy], dtype=F64)}
    )
    mu = out["mu"][0].detach()
    mc, tot = pe.mean(0), pe.sum(1)
    tot_err = float(tot.std() / math.sqrt(n_ev))
    exit_pt = (
        vtx.double()[0]
        + wall_exit_distance(vtx.double(), d.double(), "cylinder", det.radius, det.height) * d.double()[0]
    )
    far = (det.pmt_pos.double() - exit_pt).norm(dim=1) > 0.3
    sel = (mc > thr_pe) & far
    err = pe.std(0) / math.sqrt(n_ev)
    pull = ((mu - mc) / err)[sel]
    ok = ((mu - mc).abs() < torch.maximum(0.03 * mc, 2 * err))[sel]
    dt = (out["t_mean"][0].detach() - t_mc)[sel]
    res = {
        "total_exp": float(mu.sum()),
        "total_mc": float(tot.mean()),
        "total_err": tot_err,
        "n_sel": int(sel.sum()),
        "chi2_ndf": float((pull**2).mean()),
        "max_pull": float(pull.abs().max()),
        "frac_ok": float(ok.float().mean()),
        "max_dt": float(dt.abs().max()),
        "mean_dt": float(dt.mean()),
    }
    print(particle, res)
    return res


def test_electron_vs_mc_quick():
    r = _shower_mc_check(40)
    assert abs(r["total_exp"] - r["total_mc"]) < max(0.01 * r["total_mc"], 2.5 * r["total_err"])
    assert r["n_sel"] >= 100
    assert r["frac_ok"] >= 0.85
    assert r["max_dt"] < 0.15 and abs(r["mean_dt"]) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("particle", ["e-", "gamma"])
def test_shower_vs_mc(particle):
    r = _shower_mc_check(300, particle)
    assert abs(r["total_exp"] - r["total_mc"]) < max(0.01 * r["total_mc"], 2.5 * r["total_err"])
    assert r["frac_ok"] >= 0.85
    assert r["max_dt"] < 0.15 and abs(r["mean_dt"]) < 0.03


def test_cascade_angular_cdf_is_the_primitive_of_the_pdf():
    """cascade_angular_cdf (the P(1/C, z) table) against the closed form with torch.special.gammainc to 1e-9,
    its autograd derivative against physics.emission.cascade_angular_pdf (1e-6 relative, away from the cusp at
    cos = 1/n), and its difference over [-1, 1] against scipy quadrature of the pdf (1e-9 relative)."""
    from scipy.integrate import quad

    from physics.expected import cascade_angular_cdf

    n = 1.344
    a, b, c, d = emission.RW_ANGULAR_EM
    x = torch.linspace(-1.0, 1.0, 4001, dtype=F64)
    x = x[(x - 1.0 / n).abs() > 1e-3].requires_grad_()
    g = cascade_angular_cdf(x, n)
    y = x.detach() - 1.0 / n
    z = -b * y.abs() ** c
    closed = (
        torch.sign(y)
        * a
        * math.gamma(1 / c)
        / (c * (-b) ** (1 / c))
        * torch.special.gammainc(torch.full_like(z, 1 / c), z)
        + d * y
    )
    assert float((g.detach() - closed).abs().max()) < 1e-9
    (dg,) = torch.autograd.grad(g.sum(), x)
    pdf = emission.cascade_angular_pdf(x.detach(), n)
    assert torch.allclose(dg, pdf, rtol=1e-6, atol=0.0)
    ends = cascade_angular_cdf(torch.tensor([-1.0, 1.0], dtype=F64), n)
    f = lambda t: float(emission.cascade_angular_pdf(torch.tensor(t, dtype=F64), n))  # noqa: E731
    total = (
        quad(f, -1.0, 1.0 / n, epsabs=0, epsrel=1e-12)[0] + quad(f, 1.0 / n, 1.0, epsabs=0, epsrel=1e-12)[0]
    )
    assert float(ends[1] - ends[0]) == pytest.approx(total, rel=1e-9)


def test_shower_depth_cells_carry_the_profiles_moments():
    """shower_depth_nodes against closed forms of the gamma-distribution profile (electrons): the cells'
    masses sum to 1, their centroids to the mean a/b and (law of total variance) their centroids and in-cell
    variances to a/b^2; cut at the wall (t_end), the mass is P(a, b T) and the mean (a/b) P(a+1, b T) /
    P(a, b T) (scipy's regularised incomplete gamma). Gammas: the series pdf against a direct quadrature of
    the conversion-depth convolution, and mean / variance + 9/7 / + (9/7)^2. Masses to 1e-5 relative, means
    1e-4, variances 1e-3. float64 gradcheck w.r.t. energy and t_end."""
    from scipy.integrate import quad
    from scipy.special import gammainc

    from physics.expected import GAMMA_CONVERSION_X0, _shower_logpdf, _shower_profile, shower_depth_nodes

    energy = torch.tensor([150.0, 500.0, 5000.0], dtype=F64)
    a, b = (x.numpy() for x in _shower_profile("e-", energy))
    for particle, shift in (("e-", 0.0), ("gamma", GAMMA_CONVERSION_X0)):
        c = shower_depth_nodes(particle, energy, 24)
        mean = (c["w"] * c["t"]).sum(-1)
        var = (c["w"] * (c["var"] + (c["t"] - mean[:, None]) ** 2)).sum(-1)
        assert torch.allclose(c["w"].sum(-1), torch.ones(3, dtype=F64), rtol=1e-5, atol=0), particle
        assert np.allclose(mean.numpy(), a / b + shift, rtol=1e-4, atol=0), particle
        assert np.allclose(var.numpy(), a / b**2 + shift**2, rtol=1e-3, atol=0), particle
        assert bool((c["lo"] <= c["t"]).all() and (c["t"] <= c["hi"]).all())
    t_end = torch.tensor([0.7, 2.0, 3.5], dtype=F64)
    c = shower_depth_nodes("e-", energy, 24, t_end)
    assert torch.allclose(c["hi"][:, -1], t_end, rtol=1e-12, atol=0)
    mass = gammainc(a, b * t_end.numpy())
    assert np.allclose(c["w"].sum(-1).numpy(), mass, rtol=1e-5, atol=0)
    mean = (c["w"] * c["t"]).sum(-1).numpy() / mass
    assert np.allclose(mean, a / b * gammainc(a + 1, b * t_end.numpy()) / mass, rtol=1e-4, atol=0)

    lam = 1.0 / GAMMA_CONVERSION_X0
    for t in (0.3, 2.0, 7.0):
        conv = quad(
            lambda u, t=t: (
                lam
                * math.exp(-lam * u)
                * b[1] ** a[1]
                * (t - u) ** (a[1] - 1)
                * math.exp(-b[1] * (t - u))
                / math.gamma(a[1])
            ),
            0.0,
            t,
            epsabs=0,
            epsrel=1e-11,
        )[0]
        series = float(torch.exp(_shower_logpdf("gamma", *(torch.tensor(x) for x in (a[1], b[1], t)))))
        assert series == pytest.approx(conv, rel=1e-6)

    e = energy[:2].clone().requires_grad_()
    te = torch.tensor([1.2, 30.0], dtype=F64, requires_grad=True)  # cut by the wall; not cut (t_max < 30)
    for particle in ("e-", "gamma"):
        f = lambda e, te, p=particle: tuple(shower_depth_nodes(p, e, 6, te)[k] for k in ("t", "var", "w"))  # noqa: E731
        assert torch.autograd.gradcheck(f, (e, te), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_gradcheck_electron():
    assert _gradcheck_event_parameters("e-", n_depth_nodes=12)


@pytest.mark.parametrize("particle", ["e-", "gamma"])
@pytest.mark.parametrize("case", ["axis_parallel", "near_wall"])
def test_shower_edges_finite_gradients(particle, case):
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, particle, opt, n_depth_nodes=16)
    v, d = (
        ([0.0, 0.0, 0.0], [0.0, 0.0, 1.0]) if case == "axis_parallel" else ([0.97, 0.0, 0.2], [0.6, 0.0, 0.8])
    )
    v = torch.tensor([v], dtype=F64, requires_grad=True)
    d = torch.tensor([d], dtype=F64, requires_grad=True)
    e = torch.tensor([400.0], dtype=F64, requires_grad=True)
    t0 = torch.zeros(1, dtype=F64, requires_grad=True)
    out = resp.expected({"vertex": v, "direction": d, "energy": e, "t0": t0})
    loss = out["mu"].sum() + (out["t_mean"] * out["mu"]).sum() + (out["t_var"] * out["mu"]).sum()
    loss.backward()
    for x in (v, d, e, t0):
        assert torch.isfinite(x.grad).all(), case
    assert torch.isfinite(out["mu"]).all() and float(out["mu"].detach().sum()) > 0


def _bent_track_setup(n_nodes: int = 16):
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=n_nodes, fold_wavelength=True)
    p = {
        "vertex": torch.tensor([[0.1, -0.2, -0.3], [-0.2, 0.1, -0.2]], dtype=F64),
        "direction": torch.tensor([[0.3, 0.1, 0.9], [0.0, 0.0, 1.0]], dtype=F64),  # the second along z
        "energy": torch.tensor([150.0, 120.0], dtype=F64),  # contained: ranges ~0.6 m, 0.45 m
        "t0": torch.tensor([1.5, 0.0], dtype=F64),
    }
    p["direction"] = p["direction"] / p["direction"].norm(dim=-1, keepdim=True)
    return resp, p


def test_node_offset_rigid_motions_match_event_derivatives():
    """The bent-track offsets (node_offset) against two rigid motions of the straight track: shifting every
    node by c is moving the vertex by c, so d/d(vertex) = sum_k d/d(dx_k); turning the track by a transverse
    delta moves node k by s_k delta and turns its emission by delta, so the transverse part of
    d/d(direction) = sum_k (d/d(dd_k) + s_k d/d(dx_k)). Checked on a weighted sum of mu, t_mean, t_var in
    float64 autograd (measured relative differences 1e-10 and 3e-16; asserted 1e-8 and 1e-10). Contained
    tracks, since the offsets do not move the wall-exit point; times weighted by mu, as in the likelihood
    (a pruned pair's t_mean is its mu -> 0 limit from the vertex, and the time moments are centred on the
    vertex-PMT distance with a 1/(mu + MU_EPS) weight). Zero offsets leave the outputs unchanged."""
    resp, p = _bent_track_setup()
    k = resp.n_track_nodes
    v = p["vertex"].clone().requires_grad_()
    d = p["direction"].clone().requires_grad_()
    off = torch.zeros(2, k, 6, dtype=F64, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    w = [torch.rand(2, resp.n_pmts, generator=gen, dtype=F64) for _ in range(3)]
    o = resp.expected({**p, "vertex": v, "direction": d, "node_offset": off})
    ref = resp.expected(p)
    for key in ("mu", "t_mean", "t_var"):
        assert torch.allclose(o[key], ref[key], rtol=1e-12, atol=1e-14)
    total = (w[0] * o["mu"]).sum() + (ref["mu"] * (w[1] * o["t_mean"] + w[2] * o["t_var"])).sum()
    gv, gd, go = torch.autograd.grad(total, [v, d, off])
    print("vertex rel diff", float((go[..., :3].sum(1) - gv).norm() / gv.norm()))
    assert torch.allclose(go[..., :3].sum(1), gv, rtol=1e-8, atol=1e-10)
    s = resp.ms_kinks(p)["s"]  # the nodes' positions along the response's track
    turn = go[..., 3:].sum(1) + (s[..., None] * go[..., :3]).sum(1)
    dn = p["direction"]
    transverse = lambda g: g - (g * dn).sum(-1, keepdim=True) * dn  # noqa: E731
    print("direction rel diff", float((transverse(turn) - transverse(gd)).norm() / gd.norm()))
    assert torch.allclose(transverse(turn), transverse(gd), rtol=1e-10, atol=1e-12)


def test_gradcheck_node_offset():
    """float64 gradcheck of mu, t_mean, t_var w.r.t. the per-node offsets of a bent track (small detector,
    8 nodes, offsets of a few mm / mrad), with smeared and with sharp rings (the bent-track fit of
    benchmarks/ms_bent_fit.py), and with sharp rings smeared by the remaining kinks' moments node_ms (also
    w.r.t. those); a wrong shape, node_ms without sharp rings or a shower raises ConfigError."""
    resp, p = _bent_track_setup(8)
    gen = torch.Generator().manual_seed(5)
    off0 = 0.003 * torch.randn(2, 8, 6, generator=gen, dtype=F64)
    for sharp in (False, True):

        def f(off, sharp=sharp):
            o = resp.expected({**p, "node_offset": off}, sharp_rings=sharp)
            return o["mu"], o["t_mean"], o["t_var"]

        assert torch.autograd.gradcheck(f, (off0.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)
    # sharp rings smeared by the kinks outside 2 modes (node_ms): w.r.t. the offsets and the moments
    kinks = resp.ms_kinks(p)
    rest = kink_modes(kinks["s"], kinks["var"], 2)["rest"]

    def g(off, ms):
        o = resp.expected({**p, "node_offset": off, "node_ms": ms}, sharp_rings=True)
        return o["mu"], o["t_mean"], o["t_var"]

    inputs = (off0.clone().requires_grad_(), rest.clone().requires_grad_())
    assert torch.autograd.gradcheck(g, inputs, eps=1e-7, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="node_offset"):
        resp.expected({**p, "node_offset": torch.zeros(2, 7, 6, dtype=F64)})
    with pytest.raises(ConfigError, match="node_ms.*sharp_rings"):
        resp.expected({**p, "node_ms": rest})
    with pytest.raises(ConfigError, match="node_ms"):
        resp.expected({**p, "node_ms": rest[:, :, :2]}, sharp_rings=True)
    det, med, sen, opt = _small()
    shower = PhysicsResponse(det, med, sen, "e-", opt)
    with pytest.raises(ConfigError, match="node_offset"):
        shower.expected({**p, "node_offset": torch.zeros(2, 8, 6, dtype=F64)})


def test_sharp_rings_with_all_kink_moments_are_the_smeared_track() -> None:
    """A straight track with sharp rings smeared by the moments of all its kinks (kink_modes with m = 0:
    the discrete sums over the cells' Highland kinks) is the smeared straight track (the Fermi-Eyges moments
    of the cells' scattering, physics.expected.fermi_eyges_moments): per PMT above 20 % of the
    brightest within 3 %, total within 1 %, mean times within 0.1 ns (measured on the 500 MeV closure muon:
    1.0 % rms in WCTE, 0.14 % in SK). With every kink in modes (m = K) nothing is left to smear."""
    resp, p = _bent_track_setup(32)
    kinks = resp.ms_kinks(p)
    smeared = {k: v.detach() for k, v in resp.expected(p).items()}
    zero = torch.zeros(2, 32, 6, dtype=F64)
    rest = kink_modes(kinks["s"], kinks["var"], 0)["rest"]
    bent = {
        k: v.detach()
        for k, v in resp.expected({**p, "node_offset": zero, "node_ms": rest}, sharp_rings=True).items()
    }
    sel = smeared["mu"] > 0.2 * smeared["mu"].amax(1, keepdim=True)
    rel = bent["mu"][sel] / smeared["mu"][sel] - 1.0
    print("m = 0: PMTs", int(sel.sum()), "max |rel|", float(rel.abs().max()))
    assert float(rel.abs().max()) < 0.03
    assert float(bent["mu"].sum() / smeared["mu"].sum()) == pytest.approx(1.0, abs=0.01)
    assert float((bent["t_mean"] - smeared["t_mean"])[sel].abs().max()) < 0.1
    assert float(kink_modes(kinks["s"], kinks["var"], 32)["rest"].abs().max()) < 1e-12


def test_track_nodes_mean_position_matches_scattered_mc_tracks() -> None:
    """The nodes' mean position along the initial direction, s = l - int_0^l theta0^2, against the mean
    projected position of 4000 Monte-Carlo muon tracks (emission.track_steps, Highland kinks) at the same
    path length l: within 3 standard errors + 2 % of the ~1 cm deficit at the end of a 500 MeV track."""
    from physics.expected import muon_track_nodes

    m = Medium.load("water")
    n_ev = 4000
    st = emission.track_steps(
        "mu-",
        500.0,
        torch.zeros(n_ev, 3, dtype=torch.float64),
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(n_ev, 3),
        m,
        torch.Generator().manual_seed(5),
        dtype=torch.float64,
    )
    k = int(torch.bincount(st.event)[0])  # CSDA stepping: every event has the same steps
    path = (st.x1 - st.x0).norm(dim=1).reshape(n_ev, k).cumsum(1)
    deficit = path - st.x1[:, 2].reshape(n_ev, k)
    mc, err = deficit.mean(0), deficit.std(0) / math.sqrt(n_ev)
    wl = torch.linspace(m.wl_min, m.wl_max, 200, dtype=torch.float64)
    nodes = muon_track_nodes(
        torch.tensor([500.0], dtype=torch.float64),
        MUON_MASS,
        float(m.refractive_index(wl).max()),
        2048,
        lambda kin: emission.bethe_dedx(kin, MUON_MASS, m, spin_half=True),
        m.radiation_length,
    )
    lp, dl = nodes["path"][0].numpy(), (nodes["path"] - nodes["s"])[0].numpy()
    assert 0.008 < dl[-1] < 0.012  # ~1 cm at the end of the 2.2 m track
    for i in (k // 4, k // 2, 3 * k // 4, k - 1):
        model = float(np.interp(float(path[0, i]), lp, dl))
        assert abs(float(mc[i]) - model) < 3 * float(err[i]) + 0.02 * dl[-1], (i, float(mc[i]), model)


def test_fermi_eyges_moments_constant_rate_closed_form() -> None:
    """For a constant scattering rate (equal cells, equal increments) the piecewise-constant moments are the
    Brownian closed forms theta0^2 (1, l/2, l^2/3) at every node (PDG eqs. 34.18-34.20), to rounding."""
    from physics.expected import fermi_eyges_moments

    k, length, rate = 40, 3.0, 2e-3  # cells, [m], [rad^2/m]
    ds = torch.full((2, k), length / k, dtype=F64)
    path = torch.cumsum(ds, 1) - 0.5 * ds
    ms = fermi_eyges_moments(path, ds, rate * ds, rate * ds / 2)
    th2 = rate * path
    want = torch.stack([th2, th2 * path / 2, th2 * path * path / 3], -1)
    assert torch.allclose(ms, want, rtol=1e-12, atol=0.0)


def test_track_node_ms_moments_match_scattered_mc_tracks() -> None:
    """The nodes' Fermi-Eyges moments (muon_track_nodes 'ms': Var(phi), Cov(u, phi), Var(u) per projected
    plane) against 4000 Monte-Carlo 1 GeV muon tracks (emission.track_steps, Highland kinks after every
    step) at the same path lengths: each within 3 standard errors + 3 %. A stopping muon scatters most near
    its end; the constant-rate forms theta0^2 (1, l/2, l^2/3) overstate Var(u) there ~4-fold."""
    from physics.expected import muon_track_nodes

    m = Medium.load("water")
    n_ev = 4000
    st = emission.track_steps(
        "mu-",
        1000.0,
        torch.zeros(n_ev, 3, dtype=F64),
        torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand(n_ev, 3),
        m,
        torch.Generator().manual_seed(6),
        dtype=F64,
    )
    k = int(torch.bincount(st.event)[0])
    step = (st.x1 - st.x0).reshape(n_ev, k, 3)
    path = step.norm(dim=-1).cumsum(1)[0]
    u = st.x1[:, 0].reshape(n_ev, k)  # lateral position after step i
    phi = step[:, 1:, 0] / step[:, 1:].norm(dim=-1)  # direction after the kink at the end of step i
    u, path = u[:, :-1], path[:-1]
    wl = torch.linspace(m.wl_min, m.wl_max, 200, dtype=F64)
    nodes = muon_track_nodes(
        torch.tensor([1000.0], dtype=F64),
        MUON_MASS,
        float(m.refractive_index(wl).max()),
        1024,
        lambda kin: emission.bethe_dedx(kin, MUON_MASS, m, spin_half=True),
        m.radiation_length,
    )
    lp = nodes["path"][0].numpy()
    mc = {
        "var_phi": (phi * phi).mean(0),
        "cov": (u * phi).mean(0),
        "var_u": (u * u).mean(0),
    }
    se = {
        "var_phi": (phi * phi).std(0) / math.sqrt(n_ev),
        "cov": (u * phi).std(0) / math.sqrt(n_ev),
        "var_u": (u * u).std(0) / math.sqrt(n_ev),
    }
    for j, key in enumerate(("var_phi", "cov", "var_u")):
        model = nodes["ms"][0, :, j].numpy()
        for i in (k // 2, 3 * k // 4, 9 * k // 10, k - 2):
            got = float(np.interp(float(path[i]), lp, model))
            want, err = float(mc[key][i]), float(se[key][i])
            print(key, round(float(path[i]), 3), got, want, err)
            assert abs(got - want) < 3 * err + 0.03 * abs(want), (key, i, got, want, err)
    last = k - 2
    brownian = (
        float(np.interp(float(path[last]), lp, nodes["theta2"][0].numpy())) * float(path[last]) ** 2 / 3
    )
    assert brownian > 2.5 * float(mc["var_u"][last])  # what the constant-rate form would have claimed


def test_ms_time_shift_is_the_gaussian_conditional_displacement() -> None:
    """ms_time_shift against a Monte-Carlo of the kink model it conditions: (phi, u) jointly Gaussian with
    Var phi = theta0^2, Var u = theta0^2 s^2/3, Cov = theta0^2 s/2, plus independent ring-width noise; among
    samples whose ring angle phi + u cos(alpha)/d + noise lies within 0.02 sigma of the offset delta, the
    mean u gives the shift -n_g sin(alpha) E[u] / c. delta = 0.5 sigma (the 3-sigma cap changes it by 1 %),
    within 3 % + 3 standard errors; and zero on the ring. The ring variance of the Brownian moments
    (a constant rate: theta0^2 (1, s/2, s^2/3)) is the closed form theta0^2 (1 + r + r^2/3)."""
    from physics.expected import _ms_ring_terms, ms_time_shift

    th2, s, d, alpha, ng, extra = 2.5e-3, 1.2, 1.5, 0.9, 1.37, 4e-4
    lam = math.cos(alpha) / d
    r = s * lam
    sig2 = th2 * (1 + r + r * r / 3) + extra
    g = torch.Generator().manual_seed(8)
    n = 4_000_000
    z1, z2, z3 = torch.randn(3, n, generator=g, dtype=F64)
    phi = math.sqrt(th2) * z1
    # u = s/2 phi + independent part of variance theta0^2 s^2 (1/3 - 1/4)
    u = 0.5 * s * phi + math.sqrt(th2 * s * s / 12.0) * z2
    a = phi + u * math.cos(alpha) / d + math.sqrt(extra) * z3
    sig = math.sqrt(sig2)

    def t(x: float) -> torch.Tensor:
        return torch.tensor([[x]], dtype=F64)

    # the ring variance and cov_u from the Brownian moments, as the expectation computes them
    ring_var, cov_u = _ms_ring_terms(
        torch.tensor([[[th2, th2 * s / 2, th2 * s * s / 3]]], dtype=F64).unbind(-1), t(lam)[None]
    )
    assert float(ring_var) == pytest.approx(sig2 - extra, rel=1e-12)

    for delta in (0.5 * sig, -0.5 * sig):
        sel = (a - delta).abs() < 0.02 * sig
        mc = -(ng / C_M_PER_NS) * math.sin(alpha) * float(u[sel].mean())
        err = (ng / C_M_PER_NS) * math.sin(alpha) * float(u[sel].std()) / math.sqrt(int(sel.sum()))
        got = float(ms_time_shift(cov_u, t(math.sin(alpha))[None], t(delta)[None], t(sig2)[None], ng))
        assert abs(got - mc) < 0.03 * abs(mc) + 3 * err, (delta, got, mc, err)
    on_ring = ms_time_shift(cov_u, t(math.sin(alpha))[None], t(0.0)[None], t(sig2)[None], ng)
    assert float(on_ring.abs()) == 0.0


def test_track_quadrature_resolves_the_collapsing_cone() -> None:
    """Track-node quadrature of a stopping 400 MeV muon against a converged sum (K = 2048 cells), no
    multiple scattering (sharp rings, the hardest case): at K = 64 every PMT above 0.5 p.e. within 2 %, and
    those within 14 degrees of the track axis seen from the vertex (lit only by the collapsing cone of the
    track's last MeV) within 0.2 %. Cells uniform in kinetic energy were off by 9.9 % there."""
    det = _cyl(2.0, 4.0, 0.15, 0.45)
    med = Medium.load("water")
    med.radiation_length = math.inf
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0)
    vtx = torch.tensor([[0.0, 0.0, -1.6]], dtype=F64)
    d = torch.tensor([[0.1, 0.05, 1.0]], dtype=F64)
    d = d / d.norm()
    p = {"vertex": vtx, "direction": d, "energy": torch.tensor([400.0], dtype=F64)}
    mu = {
        k: PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=k).expected(p)["mu"][0].detach()
        for k in (64, 2048)
    }
    ref = mu[2048]
    rel = det.pmt_pos.double() - vtx
    ang = torch.rad2deg(torch.acos(((rel @ d[0]) / rel.norm(dim=1)).clamp(-1, 1)))
    lit = ref > 0.5
    end = lit & (ang < 14)
    assert int(end.sum()) >= 8
    err = ((mu[64] - ref) / ref).abs()
    assert float(err[lit].max()) < 0.02, float(err[lit].max())
    assert float(err[end].max()) < 0.002, float(err[end].max())
