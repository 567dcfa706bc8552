"""Expected indirect light (physics.indirect) against the Monte Carlo (physics.optics), with scattering and
reflection on; direct + indirect expectation against the MC total; float64 gradcheck.

Independent expectation: the MC mean of the simulator (every photocathode hit, weighted by the detection
probability), which transports photons by sampling, while the expectation scores every PMT at every
interaction (next-event estimation) and gets the direct part from the exact quadrature.
"""

from __future__ import annotations

import math

import pytest
import torch
from detectors import small_cylinder as _cyl

from fitting.response import PhysicsResponse
from physics import emission
from physics.config import ConfigError
from physics.indirect import indirect_light
from physics.medium import Medium
from physics.optics import Optics
from physics.records import Photons
from physics.sensors import PMTResponse

F64 = torch.float64


def _mc(photons, det, sen, opt, med, n_ev, gen, polarization=None):
    """MC p.e. per event and PMT: all hits and the indirect ones (detection probability as weight)."""
    ch = opt.sample(photons, det, med, gen, polarization=polarization)
    w = sen.detection_probability(ch.wavelength.double(), ch.cos_incidence.double(), ch.pmt).detach()
    p = det.n_pmts
    flat = ch.event * p + ch.pmt
    tot = torch.zeros(n_ev * p, dtype=F64).index_add(0, flat, w).view(n_ev, p)
    ind = torch.zeros(n_ev * p, dtype=F64).index_add(0, flat, w * ch.indirect).view(n_ev, p)
    sw2 = torch.zeros(p, dtype=F64).index_add(0, ch.pmt, w * w)  # Poisson variance of the weighted sum
    return tot, ind, sw2


def _iso_check(n_ev: int, n_ph: int, n_trace: int, diffuse: float, seed: int) -> None:
    det = _cyl(1.5, 3.0, 0.12, 0.5)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    # reflective walls and glass, so that a quarter of the light is indirect
    opt = Optics(wall_reflectivity=0.3, pmt_reflectivity=0.2, diffuse_fraction=diffuse)
    gen = torch.Generator().manual_seed(seed)
    vtx = [0.4, -0.3, 0.6]
    ph = emission.isotropic_source(torch.tensor([vtx] * n_ev, dtype=F64), n_ph, gen, wavelength=405.0)
    tot, ind, sw2 = _mc(ph, det, sen, opt, med, n_ev, gen)
    resp = PhysicsResponse(det, med, sen, "isotropic", opt, source_wavelength=405.0)
    direct = resp.expected(
        {"vertex": torch.tensor([vtx], dtype=F64), "n_photons": torch.tensor([n_ph], dtype=F64)}
    )["mu"][0].detach()
    # the expectation's own sampling error: trace K independent batches, use their spread
    k = 8
    g2 = torch.Generator().manual_seed(seed + 1)
    tr = emission.isotropic_source(
        torch.tensor([vtx] * k, dtype=F64), n_trace // k, g2, wavelength=405.0, dtype=F64
    )
    mu_k = indirect_light(tr, det, med, opt, sen, k, g2, weight=n_ph / (n_trace // k))["mu"].detach()
    mu_ind, err_ind = mu_k.mean(0), mu_k.std(0) / math.sqrt(k)
    ind_mc, ind_err = float(ind.sum(1).mean()), float(ind.sum(1).std() / math.sqrt(n_ev))
    exp_err = float(mu_k.sum(1).std() / math.sqrt(k))
    assert float(ind.sum(1).mean()) > 0.15 * float(tot.sum(1).mean())  # the test is about indirect light
    # indirect total: within 3 sigma or 2 % (runs so far scatter by -1.2 % ... +0.3 %: a bias below ~1 % of
    # the indirect light, i.e. < 0.3 % of the total, is not excluded; see the session note)
    tol = max(3 * math.hypot(ind_err, exp_err), 0.02 * ind_mc)
    assert abs(float(mu_ind.sum()) - ind_mc) < tol, (float(mu_ind.sum()), ind_mc)
    mu = direct + mu_ind
    mc = tot.mean(0)
    assert abs(float(mu.sum()) / float(mc.sum()) - 1) < 0.01
    sel = mc > 20
    # independent photons: Poisson error of the MC mean, and the expectation's batch-to-batch error
    err = torch.sqrt(sw2 / n_ev**2 + err_ind**2)
    ok = ((mu - mc).abs() < torch.maximum(0.03 * mc, 2 * err))[sel]
    assert int(sel.sum()) >= 30 and float(ok.float().mean()) >= 0.9
    assert float(((mu - mc).abs() / err)[sel].max()) < 4.5


def test_isotropic_direct_plus_indirect_vs_mc_quick():
    _iso_check(n_ev=4, n_ph=100_000, n_trace=12_000, diffuse=1.0, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("diffuse", [1.0, 0.0, 0.5])
def test_isotropic_direct_plus_indirect_vs_mc(diffuse):
    """Lambertian, mirror and mixed walls (the mirror case scores PMTs after specular reflections)."""
    _iso_check(n_ev=16, n_ph=200_000, n_trace=60_000, diffuse=diffuse, seed=21)


@pytest.mark.slow
@pytest.mark.parametrize("particle", ["mu-", "e-"])
def test_track_direct_plus_indirect_vs_mc(particle):
    """500 MeV mu- / e- (Rayleigh, absorption, wall and PMT reflection on; Cherenkov polarisation in both):
    expected direct (quadrature) + indirect (traced photons of 8 independent MC events) vs the MC mean of
    40 events: total within 1 %, PMTs above 20 p.e. within 3 % or 2 sigma (event spread)."""
    det = _cyl(2.0, 4.0, 0.15, 0.6)
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.2, pmt_reflectivity=0.1)
    vtx = torch.tensor([[0.0, 0.3, -1.2]], dtype=F64)
    d = torch.tensor([[0.0, 0.2, 1.0]], dtype=F64)
    d = d / d.norm()
    energy = 500.0
    thin = sen.max_detection_probability()

    def photons(n, gen, thin_):
        if particle == "mu-":
            st = emission.track_steps(
                particle, energy, vtx.expand(n, 3).float(), d.expand(n, 3).float(), med, gen
            )
            ph = emission.cherenkov_photons(st, med, gen, thin=thin_, chunk_photons=200_000)
        else:
            ph = emission.shower_photons(
                particle, energy, vtx.expand(n, 3).float(), d.expand(n, 3).float(), med, gen, thin=thin_
            )
        u = d.float().expand_as(ph.dir)
        pol = -(u - (u * ph.dir).sum(1, keepdim=True) * ph.dir)
        return ph, pol

    n_ev = 40
    gen = torch.Generator().manual_seed(5)
    ph, pol = photons(n_ev, gen, thin)
    tot, _, _ = _mc(ph, det, sen, opt, med, n_ev, gen, polarization=pol)
    tot = tot / thin
    resp = PhysicsResponse(det, med, sen, particle, opt)
    direct = resp.expected({"vertex": vtx, "direction": d, "energy": torch.tensor([energy], dtype=F64)})[
        "mu"
    ][0].detach()
    g2 = torch.Generator().manual_seed(6)
    n_tr, keep = 8, 0.05
    tr, tpol = photons(n_tr, g2, keep)
    tr = Photons(
        pos=tr.pos.double(),
        dir=tr.dir.double(),
        t=tr.t.double(),
        wavelength=tr.wavelength.double(),
        event=torch.zeros_like(tr.event),
    )
    mu_ind = indirect_light(
        tr, det, med, opt, sen, 1, g2, weight=1.0 / (keep * n_tr), polarization=tpol.double()
    )["mu"][0].detach()
    mu, mc = direct + mu_ind, tot.mean(0)
    tot_err = float(tot.sum(1).std() / math.sqrt(n_ev))
    assert abs(float(mu.sum()) - float(mc.sum())) < max(0.01 * float(mc.sum()), 2.5 * tot_err)
    sel = mc > (20 if particle == "mu-" else 2)
    err = tot.std(0) / math.sqrt(n_ev)
    ok = ((mu - mc).abs() < torch.maximum(0.03 * mc, 2 * err))[sel]
    assert int(sel.sum()) >= 30 and float(ok.float().mean()) >= 0.85


def test_gradcheck_detector_and_source_parameters():
    """float64 gradcheck of the indirect p.e. w.r.t. the absorption and Rayleigh scales, wall and PMT
    reflectivities, diffuse fraction, per-PMT QE scale and the source position (fixed random numbers)."""
    det = _cyl(0.6, 1.2, 0.1, 0.5)
    med = Medium.load("water").double()
    sen = PMTResponse.load("default", n_pmts=det.n_pmts).double()
    opt = Optics(wall_reflectivity=0.4, pmt_reflectivity=0.2, diffuse_fraction=0.7).double()
    with torch.no_grad():
        med.rayleigh_scale.fill_(0.02)  # short scattering length: every order of scattering matters
        med.abs_scale.fill_(0.1)
    base = emission.isotropic_source(
        torch.zeros(1, 3, dtype=F64), 8, torch.Generator().manual_seed(2), wavelength=420.0, dtype=F64
    )

    slots = [
        (med, "abs_scale"),
        (med, "rayleigh_scale"),
        (opt, "wall_reflectivity"),
        (opt, "pmt_reflectivity"),
        (opt, "diffuse_fraction"),
        (sen, "qe_scale"),
    ]

    def g(*args):
        """Functional form: the parameters are routed through the modules on every call."""
        saved = [getattr(m, name) for m, name in slots]
        try:
            for (m, name), val in zip(slots, args[:-1], strict=True):
                delattr(m, name)
                setattr(m, name, val)
            ph = Photons(
                pos=base.pos + args[-1], dir=base.dir, t=base.t, wavelength=base.wavelength, event=base.event
            )
            return indirect_light(ph, det, med, opt, sen, 1, torch.Generator().manual_seed(3), max_rounds=3)[
                "mu"
            ].sum(1)
        finally:
            for (m, name), par in zip(slots, saved, strict=True):
                delattr(m, name)
                m.register_parameter(name, par)

    args = (
        torch.tensor(0.1, dtype=F64),
        torch.tensor(0.02, dtype=F64),
        torch.tensor(0.4, dtype=F64),
        torch.tensor(0.2, dtype=F64),
        torch.tensor(0.7, dtype=F64),
        torch.ones(det.n_pmts, dtype=F64),
        torch.tensor([0.05, -0.02, 0.1], dtype=F64),
    )
    args = tuple(a.clone().requires_grad_(True) for a in args)
    out = g(*args)
    assert float(out.sum().detach()) > 0
    grads = torch.autograd.grad(out.sum(), args)
    assert all(bool(torch.isfinite(gr).all()) for gr in grads)
    assert torch.autograd.gradcheck(g, args, eps=1e-6, atol=1e-7, rtol=1e-4, fast_mode=True)


def test_bad_input():
    det = _cyl(0.6, 1.2, 0.1, 0.35)
    med, sen, opt = Medium.load("water"), PMTResponse.load("default", n_pmts=det.n_pmts), Optics()
    ph = emission.isotropic_source(
        torch.zeros(2, 3, dtype=F64), 5, torch.Generator().manual_seed(0), dtype=F64
    )
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ConfigError, match="photons.event"):
        indirect_light(ph, det, med, opt, sen, 1, gen)
    with pytest.raises(ConfigError, match="weight"):
        indirect_light(ph, det, med, opt, sen, 2, gen, weight=torch.ones(3))
    with pytest.raises(ConfigError, match="polarization"):
        indirect_light(ph, det, med, opt, sen, 2, gen, polarization=torch.ones(4, 3))
    with pytest.raises(ConfigError, match="max_rounds"):
        indirect_light(ph, det, med, opt, sen, 2, gen, max_rounds=0)
    empty = ph.select(torch.zeros(0, dtype=torch.long))
    out = indirect_light(empty, det, med, opt, sen, 2, gen)
    assert out["mu"].shape == (2, det.n_pmts) and float(out["mu"].abs().sum()) == 0.0


def _response_setup():
    """A small cylinder (r 0.8 m, h 1.6 m) with strong scattering and reflection, in float64: (detector,
    medium, sensors, optics) for the PhysicsResponse indirect-light tests."""
    det = _cyl(0.8, 1.6, 0.1, 0.4)
    med = Medium.load("water").double()
    sen = PMTResponse.load("default", n_pmts=det.n_pmts).double()
    opt = Optics(wall_reflectivity=0.3, pmt_reflectivity=0.2, diffuse_fraction=0.8).double()
    with torch.no_grad():
        med.rayleigh_scale.fill_(0.05)
    return det, med, sen, opt


@pytest.mark.parametrize("particle", ["mu-", "e-", "isotropic"])
def test_response_indirect_gradcheck_and_freeze(particle):
    """PhysicsResponse(indirect=...): mu_indirect is reproducible (fixed seed: frozen == fresh at the same
    parameters), and float64 gradcheck in vertex, direction and energy (photon number for the source) with
    the traced photons frozen; finite gradients."""
    det, med, sen, opt = _response_setup()
    resp = PhysicsResponse(
        det,
        med,
        sen,
        particle,
        opt,
        n_track_nodes=16,
        n_depth_nodes=8,
        indirect={"n_trace": 150, "seed": 4, "max_rounds": 3},
    )
    v = torch.tensor([[0.1, -0.2, -0.3]], dtype=F64)
    d = torch.tensor([[0.3, 0.1, 1.0]], dtype=F64)
    second = torch.tensor([60.0 if particle != "isotropic" else 5e4], dtype=F64)
    key = "n_photons" if particle == "isotropic" else "energy"

    def params(v_, d_, s_):
        p = {"vertex": v_, key: s_}
        if particle != "isotropic":
            p["direction"] = d_
        return p

    fresh = resp.expected(params(v, d, second))["mu_indirect"]
    resp.freeze_indirect(params(v, d, second))
    frozen = resp.expected(params(v, d, second))["mu_indirect"]
    torch.testing.assert_close(fresh, frozen)
    assert float(frozen.detach().sum()) > 0

    def f(v_, d_, s_):
        return resp.expected(params(v_, d_, s_))["mu_indirect"].sum(1)

    args = tuple(x.clone().requires_grad_(True) for x in (v, d, second))
    grads = torch.autograd.grad(f(*args).sum(), args, allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-3, fast_mode=True)
    resp.release_indirect()
    with pytest.raises(ConfigError, match="indirect"):
        PhysicsResponse(det, med, sen, particle, None, indirect={})
    with pytest.raises(ConfigError, match="unknown keys"):
        PhysicsResponse(det, med, sen, particle, opt, indirect={"n_traces": 3})


def test_response_indirect_template():
    """PhysicsResponse(indirect={"template": True}): frozen at a point, mu_indirect is the traced light there
    (the same as without the template), elsewhere that light per emitted photon times the photon yield
    (physics.indirect.track_photon_yield, independent of the vertex and direction: their gradients are
    zero, the energy's passes gradcheck); unfrozen it is traced; a non-bool template is a ConfigError."""
    from physics.indirect import track_photon_yield

    det, med, sen, opt = _response_setup()
    kw = {"n_track_nodes": 16}
    ind = {"n_trace": 150, "seed": 4, "max_rounds": 3}
    traced = PhysicsResponse(det, med, sen, "mu-", opt, indirect=ind, **kw)
    tmpl = PhysicsResponse(det, med, sen, "mu-", opt, indirect={**ind, "template": True}, **kw)
    p0 = {
        "vertex": torch.tensor([[0.1, -0.2, -0.3]], dtype=F64),
        "direction": torch.tensor([[0.3, 0.1, 1.0]], dtype=F64) / math.sqrt(1.1),
        "energy": torch.tensor([300.0], dtype=F64),
    }
    torch.testing.assert_close(tmpl.expected(p0)["mu_indirect"], traced.expected(p0)["mu_indirect"])
    traced.freeze_indirect(p0)
    tmpl.freeze_indirect(p0)
    at0 = traced.expected(p0)["mu_indirect"]
    torch.testing.assert_close(tmpl.expected(p0)["mu_indirect"], at0, rtol=1e-12, atol=0.0)
    p1 = {**p0, "vertex": p0["vertex"] + 0.05, "energy": torch.tensor([400.0], dtype=F64)}
    ratio = track_photon_yield("mu-", p1["energy"], med) / track_photon_yield("mu-", p0["energy"], med)
    torch.testing.assert_close(tmpl.expected(p1)["mu_indirect"], at0 * ratio, rtol=1e-12, atol=0.0)
    assert float(ratio) > 1.2  # the yield grows with the energy: the check is not trivial

    v, d, e = (p1[k].clone().requires_grad_(True) for k in ("vertex", "direction", "energy"))
    mu = tmpl.expected({"vertex": v, "direction": d, "energy": e})["mu_indirect"].sum()
    gv, gd, ge = torch.autograd.grad(mu, (v, d, e), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in (gv, gd)) and float(ge) > 0

    def f(e_):
        return tmpl.expected({**p1, "energy": e_})["mu_indirect"].sum(1)

    assert torch.autograd.gradcheck(f, (p1["energy"].clone().requires_grad_(True),), eps=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="indirect.template: got 'yes'"):
        PhysicsResponse(det, med, sen, "mu-", opt, indirect={"template": "yes"}, **kw)


def test_frozen_indirect_template_follows_the_rows():
    """fitting.response FROZEN_ROW: a fit that evaluates a subset of its frozen events, or repeated copies
    (the reconstruction's active events, its finite-difference copies), gets each row's own frozen indirect
    template: equal to that row of the full evaluation, not a fresh draw; a row outside the frozen events
    is a ConfigError naming the key."""
    from fitting.response import FROZEN_ROW

    det, med, sen, opt = _response_setup()
    ind = {"n_trace": 120, "seed": 4, "max_rounds": 3, "template": True}
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=16, indirect=ind)
    d = torch.tensor([[0.3, 0.1, 1.0], [0.0, 1.0, 0.2], [-1.0, 0.2, 0.1]], dtype=F64)
    p = {
        "vertex": torch.tensor([[0.1, -0.2, -0.3], [0.0, 0.3, 0.1], [-0.2, 0.0, 0.4]], dtype=F64),
        "direction": d / d.norm(dim=-1, keepdim=True),
        "energy": torch.tensor([300.0, 200.0, 250.0], dtype=F64),
    }
    resp.freeze_indirect(p)
    full = resp.expected(p)["mu_indirect"]
    assert bool((full.sum(1) > 0).all())
    rows = torch.tensor([2, 0, 2, 2])
    sub = {k: v[rows] for k, v in p.items()}
    got = resp.expected({**sub, FROZEN_ROW: rows})["mu_indirect"]
    torch.testing.assert_close(got, full[rows], rtol=1e-10, atol=1e-12)
    fresh = resp.expected(sub)["mu_indirect"]  # without the rows: drawn anew at these energies
    assert float((fresh - full[rows]).abs().max()) > 1e-6 * float(full.max())
    with pytest.raises(ConfigError, match="frozen_row"):
        resp.expected({**sub, FROZEN_ROW: torch.tensor([0, 1, 2, 3])})
