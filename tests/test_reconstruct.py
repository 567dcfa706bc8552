"""Reconstruction (fitting.reconstruct, fitting.prefit) and the wavelength-folded expected model.

Independent expectations: the exact (E,P,K,L) quadrature of physics.expected for the folded fast path;
the Monte-Carlo truth of physics.simulate for the pre-fit and the fit (closure, direct light only: wall and
PMT reflection and Rayleigh scattering switched off so the direct-light model is the whole truth).
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import h5py
import numpy as np
import pytest
import torch
from detectors import small_cylinder

import physics.expected as px
from fitting.likelihood import HitLikelihood, hits_to_dense
from fitting.prefit import prefit
from fitting.reconstruct import (
    STATUS,
    _base_from_x,
    _hessian,
    _local_nll,
    _local_to_params,
    add_reconstruct_parser,
    reconstruct,
    resolutions,
    status_names,
)
from fitting.response import PhysicsResponse
from physics.config import ConfigError
from physics.geometry import Detector, cylinder_grid
from physics.medium import Medium
from physics.optics import Optics
from physics.records import Hits
from physics.sensors import PMTResponse
from physics.simulate import SimConfig, Simulator

F64 = torch.float64
VTX, DIR = (0.0, 0.0, -1.2), (0.2, 0.1, 1.0)  # 500 MeV muon fully contained in WCTE (range ~2.3 m)


def _small():
    pos, nrm = cylinder_grid(1.0, 2.0, 0.08, 0.5)
    det = Detector("t", "cylinder", 1.0, 2.0, pos, nrm, torch.full((len(pos),), 0.08, dtype=F64)).to(
        dtype=F64
    )
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    return det, med, sen, Optics(wall_reflectivity=0.0, pmt_reflectivity=0.1)


def _direct_only_sim(
    n: int, seed: int, energy: float = 500.0, particle: str = "mu-", vertex=VTX, direction=DIR
):
    cfg = SimConfig(
        detector="wcte",
        particle=particle,
        energy=energy,
        vertex=vertex,
        direction=direction,
        optics={"wall_reflectivity": 0.0, "pmt_reflectivity": 0.0},
    )
    sim = Simulator(cfg)
    sim.medium.rayleigh_scale.data.fill_(math.inf)  # no scattering: direct light is the whole signal
    res = sim.run(n, seed=seed, batch_size=n)
    track = {"n_track_nodes": 32, "fold_wavelength": True} if particle.startswith("mu") else {}
    resp = PhysicsResponse(sim.detector, sim.medium, sim.sensors, particle, sim.optics, **track)
    like = HitLikelihood(**resp.likelihood_config(), window=cfg.dark_window_ns)
    return sim, res, resp, like


def _bench_muon() -> dict[str, torch.Tensor]:
    """Float64 event parameters of _direct_only_sim's default event (a 500 MeV muon at VTX along DIR)."""
    return {
        "vertex": torch.tensor([VTX], dtype=F64),
        "direction": torch.tensor([DIR], dtype=F64) / torch.tensor(DIR, dtype=F64).norm(),
        "energy": torch.tensor([500.0], dtype=F64),
        "t0": torch.zeros(1, dtype=F64),
    }


# --------------------------------------------------------------------------------------------------------
def test_folded_wavelength_matches_exact_quadrature():
    """Folded (O(EPK)) vs exact (O(EPKL)) direct light: total mu to 0.3%, PMTs > 5 p.e. to 1.5%,
    mean time to 20 ps, time variance to 10%
    (the folded chromatic angle spread is a delta-method Gaussian)."""
    det, med, sen, opt = _small()
    ev = {
        "vertex": torch.tensor([[0.1, -0.2, -0.5], [-0.3, 0.2, 0.0]], dtype=F64),
        "direction": torch.tensor([[0.2, 0.1, 1.0], [1.0, 0.3, -0.2]], dtype=F64),
        "energy": torch.tensor([400.0, 250.0], dtype=F64),
        "t0": torch.tensor([0.0, 3.0], dtype=F64),
    }
    with torch.no_grad():
        ex = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=64).expected(ev)
        fo = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=64, fold_wavelength=True).expected(ev)
    tot = fo["mu"].sum(1) / ex["mu"].sum(1) - 1
    big = ex["mu"] > 5
    rel = ((fo["mu"] - ex["mu"]) / ex["mu"])[big]
    print(
        f"folded vs exact: total {tot.detach().tolist()}, "
        f"max rel {float(rel.detach().abs().max()):.4f} over {int(big.sum())}"
    )
    assert int(big.sum()) >= 10
    assert float(tot.abs().max()) < 3e-3
    assert float(rel.abs().max()) < 0.015
    assert float((fo["t_mean"] - ex["t_mean"])[big].abs().max()) < 0.02
    vr = (fo["t_var"] / ex["t_var"])[big]
    assert float((vr - 1).abs().max()) < 0.1


def test_colour_bands_reduce_to_the_exact_sum():
    """The folded kernel with G wavelength bands (physics.expected.direct_light_folded, colour_groups):
    with one wavelength node per band (G = L) every band's spectrum is a line, so the chromatic terms vanish
    and the folded sum is the exact (E,P,K,L) quadrature term by term: without multiple scattering mu, mean
    time and variance agree to rounding (measured 2e-15, 0, 6e-14). With multiple scattering the mean times
    still agree (5e-6 ns measured); the variances differ by up to 2.2 % because the exact kernel shifts each
    node's arrival time for multiple scattering at the light-weighted mean Cherenkov angle, the bands at
    their own. In between, 3 bands sit closer to the exact sum than 1 (measured max |dt| 0.26 against
    2.3 ps, variance 0.2 % against 3 %)."""
    det, med, sen, opt = _small()
    med.radiation_length = math.inf
    ev = {
        "vertex": torch.tensor([[0.1, -0.2, -0.5], [-0.3, 0.2, 0.0]], dtype=F64),
        "direction": torch.tensor([[0.2, 0.1, 1.0], [1.0, 0.3, -0.2]], dtype=F64),
        "energy": torch.tensor([400.0, 250.0], dtype=F64),
        "t0": torch.tensor([0.0, 3.0], dtype=F64),
    }
    n_wl = PhysicsResponse(det, med, sen, "mu-", opt)._wavelength_nodes(F64, torch.device("cpu"))[0].numel()
    with torch.no_grad():
        ex = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=64).expected(ev)
        fo = {
            g: PhysicsResponse(
                det, med, sen, "mu-", opt, n_track_nodes=64, fold_wavelength=True, colour_groups=g
            ).expected(ev)
            for g in (1, 3, n_wl)
        }
    big = ex["mu"] > 0.5
    assert int(big.sum()) >= 10

    def dev(o):
        return (
            float(((o["mu"] - ex["mu"]) / ex["mu"])[big].abs().max()),
            float((o["t_mean"] - ex["t_mean"])[big].abs().max()),
            float((o["t_var"] / ex["t_var"] - 1)[big].abs().max()),
        )

    d1, d3, dl = dev(fo[1]), dev(fo[3]), dev(fo[n_wl])
    print(f"max |rel mu|, |dt| [ns], |var ratio - 1|: G=1 {d1}, G=3 {d3}, G=L={n_wl} {dl}")
    assert dl[0] < 1e-12 and dl[1] < 1e-9 and dl[2] < 1e-9
    assert d3[1] < 0.5 * d1[1] and d3[2] < 0.5 * d1[2]
    med.radiation_length = Medium.load("water").radiation_length  # with multiple scattering
    with torch.no_grad():
        ex = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=64).expected(ev)
        fl = PhysicsResponse(
            det, med, sen, "mu-", opt, n_track_nodes=64, fold_wavelength=True, colour_groups=n_wl
        ).expected(ev)
    dl = dev(fl)
    assert dl[0] < 1e-12 and dl[1] < 1e-4 and dl[2] < 0.05


@pytest.mark.parametrize("groups", [1, 3])
def test_mu_only_path_is_the_full_mu(groups):
    """PhysicsResponse.expected_mu (physics.expected.direct_light_folded mu_only: the time moments, colour
    terms and time tables skipped) gives expected()['mu'] and its gradient in vertex, direction and energy
    to rounding (float64), for 1 and 3 wavelength bands, with the pruning bound, and for explicitly kinked
    sharp-ring tracks sharing one bound per group (the sampled kink sets of ms_kink_expectations); the exact
    wavelength sum drops its times. Measured: equal to 1e-16 relative."""
    det, med, sen, opt = _small()
    ev = {
        "vertex": torch.tensor([[0.1, -0.2, -0.5], [-0.3, 0.2, 0.0]], dtype=F64),
        "direction": torch.tensor([[0.2, 0.1, 1.0], [1.0, 0.0, 0.0]], dtype=F64),  # the second along x
        "energy": torch.tensor([400.0, 250.0], dtype=F64),
        "t0": torch.tensor([0.0, 3.0], dtype=F64),
    }
    resp = PhysicsResponse(
        det, med, sen, "mu-", opt, n_track_nodes=16, fold_wavelength=True, colour_groups=groups
    )
    keys = ("vertex", "direction", "energy")

    def mu_and_grad(fn):
        p = {k: v.clone().requires_grad_(k in keys) for k, v in ev.items()}
        mu = fn(p)
        g = torch.autograd.grad(
            (mu * torch.linspace(0.5, 1.5, mu.shape[1], dtype=F64)).sum(), [p[k] for k in keys]
        )
        return mu.detach(), g

    full, g_full = mu_and_grad(lambda p: resp.expected(p)["mu"])
    fast, g_fast = mu_and_grad(resp.expected_mu)
    assert float(full.sum()) > 100.0
    assert torch.allclose(fast, full, rtol=1e-12, atol=1e-15)
    for a, b in zip(g_fast, g_full, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # kinked sharp rings, two copies of each track sharing one pruning bound
    rep = {k: v.repeat_interleave(2, 0) for k, v in ev.items()}
    off = 0.02 * torch.randn(4, 16, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    kinked = {**rep, "node_offset": off}
    a = resp._expected(kinked, True, 2, mu_only=True)
    b = resp._expected(kinked, True, 2)
    assert set(a) == {"mu"}
    assert torch.allclose(a["mu"], b["mu"], rtol=1e-12, atol=1e-15)
    exact = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=16)
    with torch.no_grad():
        assert torch.equal(exact.expected_mu(ev), exact.expected(ev)["mu"])


def test_colour_bands_partition_and_bad_input():
    """colour_bands: contiguous, non-empty bands covering every node once, each with ~1/G of the light
    (within the largest node's share); a band count outside [1, L] and colour_groups without the folded
    track kernel raise ConfigError naming the field."""
    det, med, sen, opt = _small()
    w = torch.rand(15, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.2
    for g in (1, 2, 3, 5, 15):
        b = px.colour_bands(w, g)
        assert b.shape == (g, 15) and torch.equal(b.sum(0), torch.ones(15, dtype=F64))
        idx = [row.nonzero()[:, 0] for row in b]
        assert all(len(i) >= 1 and int(i[-1] - i[0]) + 1 == len(i) for i in idx)  # non-empty, contiguous
        assert all(int(i[0]) > int(j[-1]) for j, i in zip(idx[:-1], idx[1:], strict=True))  # in order
        share = (b * w).sum(1) / w.sum()
        assert float((share - 1 / g).abs().max()) <= float(w.max() / w.sum()) + 1e-12
    with pytest.raises(ConfigError, match="colour_groups: got 16"):
        px.colour_bands(w, 16)
    with pytest.raises(ConfigError, match="colour_groups: got 0"):
        px.colour_bands(w, 0)
    with pytest.raises(ConfigError, match="colour_groups"):
        PhysicsResponse(det, med, sen, "mu-", opt, colour_groups=3)  # exact sum: no bands
    with pytest.raises(ConfigError, match="colour_groups"):
        PhysicsResponse(det, med, sen, "e-", opt, fold_wavelength=True, colour_groups=3)


def test_folded_time_follows_the_colour_across_the_ring():
    """Folded vs exact mean arrival time in a 15 m tank with sharp rings (no multiple scattering, 20-inch
    PMTs): across a ring the colour of the light changes (blue leaves at a larger angle and travels
    slower), which the folded kernel takes from its ring offset (physics.expected.chromatic_time_terms).
    Without that the folded times scattered 217 ps rms (up to 1.2 ns) about the exact sum's over the PMTs
    above 0.5 p.e.; measured with it: rms 51 ps, mean +40 ps, largest 134 ps, variance ratio 0.98, mu 3.6 %
    rms. Three wavelength bands (colour_groups=3), each folded the same way, take most of the rest: rms 7 ps,
    mean -2 ps, mu 0.62 % rms."""
    det = small_cylinder(15.0, 30.0, 0.254, 1.5)
    med = Medium.load("water")
    med.radiation_length = math.inf
    sen = PMTResponse.load("20inch", n_pmts=det.n_pmts)
    opt = Optics(wall_reflectivity=0.0, pmt_reflectivity=0.0)
    d = torch.tensor([[0.2, 0.1, 1.0]], dtype=F64)
    ev = {
        "vertex": torch.tensor([[0.0, 0.0, -5.0]], dtype=F64),
        "direction": d / d.norm(),
        "energy": torch.tensor([500.0], dtype=F64),
        "t0": torch.zeros(1, dtype=F64),
    }
    with torch.no_grad():
        ex = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=64).expected(ev)
        fo, fo3 = (
            PhysicsResponse(
                det, med, sen, "mu-", opt, n_track_nodes=64, fold_wavelength=True, colour_groups=g
            ).expected(ev)
            for g in (1, 3)
        )
    m = ex["mu"][0] > 0.5
    assert int(m.sum()) >= 100
    dt, dt3 = ((f["t_mean"] - ex["t_mean"])[0][m] for f in (fo, fo3))
    vr = (fo["t_var"] / ex["t_var"])[0][m]
    rms, rms3 = (float(x.pow(2).mean().sqrt()) for x in (dt, dt3))
    mu_rms, mu_rms3 = (float(((f["mu"] - ex["mu"]) / ex["mu"])[0][m].pow(2).mean().sqrt()) for f in (fo, fo3))
    print(
        f"{int(m.sum())} PMTs: 1 band mean {1e3 * float(dt.mean()):+.0f} ps, rms {1e3 * rms:.0f} ps, "
        f"mu rms {100 * mu_rms:.2f} %; 3 bands {1e3 * float(dt3.mean()):+.0f} / {1e3 * rms3:.0f} ps, "
        f"mu rms {100 * mu_rms3:.2f} %"
    )
    assert rms < 0.08
    assert float(dt.abs().max()) < 0.3
    assert abs(float(vr.mean()) - 1.0) < 0.05 and float(vr.min()) > 0.7
    assert rms3 < 0.5 * rms and mu_rms3 < 0.5 * mu_rms  # the bands resolve the colour across the ring


@pytest.mark.parametrize("groups", [1, 3])
def test_folded_gradcheck_event_and_detector_parameters(groups):
    det, med, sen, opt = _small()
    med = med.double()
    resp = PhysicsResponse(
        det, med, sen.double(), "mu-", opt, n_track_nodes=8, fold_wavelength=True, colour_groups=groups
    )

    def f(v, d, e, t0, abs_s):
        pr = torch.func.functional_call(
            resp, {"medium.abs_scale": abs_s}, ({"vertex": v, "direction": d, "energy": e, "t0": t0},)
        )
        return pr["mu"][:, :12], pr["t_mean"][:, :12], pr["t_var"][:, :12]

    args = tuple(
        x.clone().requires_grad_()
        for x in (
            torch.tensor([[0.1, -0.2, -0.3]], dtype=F64),
            torch.tensor([[0.3, 0.1, 0.9]], dtype=F64),
            torch.tensor([300.0], dtype=F64),
            torch.tensor([1.0], dtype=F64),
            torch.tensor(1.0, dtype=F64),
        )
    )
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_prefit_seeds_contained_muons():
    """Time-residual + track-time pre-fit on MC muons: vertex within 0.7 m, direction within 15 deg,
    energy within 35% (seed quality needed to land in the likelihood's basin)."""
    sim, res, resp, _ = _direct_only_sim(6, seed=21)
    obs = hits_to_dense(
        res["hits"].pmt, res["hits"].charge, res["hits"].time, res["hits"].event, 6, resp.n_pmts
    )
    s = prefit(obs, sim.detector.pmt_pos, resp)
    tr = res["truth"]
    dv = (s["vertex"] - tr["vertex"].double()).norm(dim=-1)
    ang = torch.rad2deg(torch.acos((s["direction"] * tr["direction"].double()).sum(-1).clamp(-1, 1)))
    de = s["energy"] / tr["energy"].double() - 1
    print(f"prefit dv {dv.tolist()} ang {ang.tolist()} de {de.tolist()}")
    assert float(dv.max()) < 0.7 and float(ang.max()) < 15.0 and float(de.abs().max()) < 0.35


def _pid_sample_seeds(n: int, seed: int, **sample_kw):
    """Pre-fit seeds of n fitting.pid.contained_sample muons (``sample_kw``: energy, full_optics) with the
    muon response: (simulator, seeds, vertex distance to the MC's (n,) [m], direction angle (n,) [deg])."""
    from fitting.pid import contained_sample, sample_models

    sim, res = contained_sample("mu-", n, seed=seed, **sample_kw)
    resp, like = sample_models(sim)
    h = res["hits"]
    obs = hits_to_dense(h.pmt, h.charge, h.time, h.event, n, sim.detector.n_pmts)
    s = prefit(obs, sim.detector.pmt_pos, resp["mu-"], mu_dark=float(like.mu_dark.mean()))
    tr = res["truth"]
    dv = (s["vertex"] - tr["vertex"].double()).norm(dim=-1)
    ang = torch.rad2deg(torch.acos((s["direction"] * tr["direction"].double()).sum(-1).clamp(-1, 1)))
    return sim, s, dv, ang


@pytest.mark.parametrize("seed", [1011, 1039])
def test_prefit_seeds_with_scattered_and_reflected_light(seed):
    """8 contained 500 MeV muons simulated with WCTE's wall/PMT reflection and Rayleigh scattering on (10 %
    of the light indirect, arriving late): every pre-fit vertex inside the tank and within 0.7 m of the
    MC's, direction within 15 deg. With a symmetric soft-L1 time loss 3 of the 8 seeds of 1011 left the
    tank (the late light pulled the track fit past the end cap); the time loss is asymmetric for that
    reason. In 1039 the track time fit turned one direction 102 deg from the truth (the ring's axis: 1.8
    deg; the muon was then misidentified as an electron), hence the ring-axis check of the pre-fit."""
    sim, s, dv, ang = _pid_sample_seeds(8, seed, full_optics=True)
    print(f"prefit dv {dv.tolist()} ang {ang.tolist()}")
    assert bool(sim.detector.inside(s["vertex"].to(sim.detector.pmt_pos.dtype)).all())
    assert float(dv.max()) < 0.7 and float(ang.max()) < 15.0


def test_prefit_direction_of_short_muon_tracks():
    """16 contained 200 MeV muons in WCTE (track ~0.8 m, direct light): the track time fit alone turned the
    directions 23-69 deg from the truth (median ~35 deg: a short track's emission points nearly coincide, so
    its times hardly fix the axis); the pre-fit falls back on the ring's charge-weighted axis when the two
    disagree by > RING_AGREEMENT_DEG. Asserted: median within 10 deg, >= 14 of 16 within 15 deg
    (measured: median 4.4 deg, one at 26.7 deg, where the time fit and the ring agree)."""
    _, _, _, ang = _pid_sample_seeds(16, 5, energy=200.0)
    print(f"prefit direction error [deg] {ang.tolist()}")
    assert float(ang.median()) < 10.0
    assert int((ang < 15.0).sum()) >= 14


def test_time_loss_shape():
    """fitting.prefit.time_loss: soft-L1 sqrt(1+z^2)-1 early, Cauchy ln(1+z^2)/2 late; value 0, slope 0 and
    curvature 1 at z = 0 from both sides (finite differences), late pull z/(1+z^2) below the early one."""
    from fitting.prefit import time_loss

    z = torch.tensor([-3.0, -0.5, 0.5, 3.0, 30.0], dtype=F64)
    ref = torch.where(z < 0, torch.sqrt(1 + z * z) - 1, 0.5 * torch.log1p(z * z))
    assert torch.allclose(time_loss(z), ref, rtol=0, atol=1e-15)
    h = 1e-4
    for side in (-1.0, 1.0):
        a, b = torch.tensor(side * h, dtype=F64), torch.tensor(side * 2 * h, dtype=F64)
        assert float(time_loss(torch.zeros((), dtype=F64))) == 0.0
        # one-sided second difference: (f(2h) - 2 f(h) + f(0)) / h^2 -> f''(0) = 1; slope f(h)/h -> 0
        assert abs(float((time_loss(b) - 2 * time_loss(a)) / h**2) - 1.0) < 1e-3
        assert abs(float(time_loss(a) / h)) < 1e-3
    zz = torch.tensor([1.0, 3.0, 10.0], dtype=F64, requires_grad=True)
    (g_late,) = torch.autograd.grad(time_loss(zz).sum(), zz)
    (g_early,) = torch.autograd.grad(time_loss(-zz).sum(), zz)
    assert torch.allclose(g_late, zz.detach() / (1 + zz.detach() ** 2))
    assert bool((g_late < g_early.abs()).all())


def test_energy_seed_inverts_the_expected_charge_across_the_muon_threshold():
    """energy_from_charge on the response's own expected total charge returns the energy it came from
    (piecewise-linear ladder, one 300-800 MeV segment: within 8 %) for contained tracks from 80 MeV (just
    above the ~54 MeV muon Cherenkov threshold) to 500 MeV, and a charge fainter than the first lit rung
    (70 MeV) gets that rung (a sub-threshold seed has no light, so no gradient in energy: 200 MeV muons in
    WCTE then failed 45 % of fits)."""
    from fitting.prefit import energy_from_charge

    _, _, resp, _ = _direct_only_sim(1, seed=3)
    e_true = torch.tensor([80.0, 150.0, 200.0, 280.0, 500.0], dtype=F64)
    n = len(e_true)
    v = torch.tensor(VTX, dtype=F64).expand(n, 3)
    d = torch.nn.functional.normalize(torch.tensor(DIR, dtype=F64), dim=0).expand(n, 3)
    with torch.no_grad():
        q = resp.expected({"vertex": v, "direction": d, "energy": e_true, "t0": torch.zeros(n, dtype=F64)})
    e = energy_from_charge(q["mu"].sum(1), resp, v, d)
    assert float((e / e_true - 1).abs().max()) < 0.08, (e / e_true - 1).tolist()
    faint = energy_from_charge(torch.full((2,), 0.5, dtype=F64), resp, v[:2], d[:2])
    assert bool((faint > 54.0).all()) and bool((faint <= 70.0).all()), faint.tolist()


def test_closure_quick():
    """3 contained 500 MeV muons (direct light only), default optimiser: converged fits within 15 cm, 2.5 deg,
    6% energy of truth, NLL at the fit not above the NLL at the truth, finite Hessian uncertainties."""
    sim, res, resp, like = _direct_only_sim(3, seed=3)
    fit = reconstruct(
        res["hits"],
        3,
        resp,
        like,
        "mu-",
        n_starts=1,
        batch_size=3,
        max_iter=40,
        dtype=torch.float32,
    )
    tr = res["truth"]
    r = resolutions(fit, tr, mask=torch.isfinite(fit["nll"]))
    print(
        "status",
        [status_names(int(x)) for x in fit["status"]],
        "dv",
        r["vertex_dist"].tolist(),
        "angle",
        torch.rad2deg(r["angle"]).tolist(),
        "de",
        r["de_frac"].tolist(),
    )
    assert bool(fit["ok"].all())
    assert float(r["vertex_dist"].max()) < 0.15
    assert math.degrees(float(r["angle"].max())) < 2.5
    assert float(r["de_frac"].abs().max()) < 0.06
    obs = hits_to_dense(
        res["hits"].pmt, res["hits"].charge, res["hits"].time, res["hits"].event, 3, resp.n_pmts
    )
    with torch.no_grad():
        nll_true = like(
            resp.expected(
                {
                    "vertex": tr["vertex"].double(),
                    "direction": tr["direction"].double(),
                    "energy": tr["energy"].double(),
                    "t0": torch.zeros(3, dtype=F64),
                }
            ),
            obs,
        )
    assert bool((fit["nll"] <= nll_true + 1e-3).all())
    assert bool(torch.isfinite(fit["sigma_vertex"]).all()) and bool((fit["sigma_vertex"] > 0).all())
    assert bool((fit["sigma_vertex"] < 0.2).all()) and bool((fit["sigma_dir"] < 0.05).all())
    # reported covariance = Hessian^-1 + the fit's linear response to multiple-scattering kinks
    # (fitting.uncertainty.kink_response_covariance): symmetric positive semi-definite, vertex and direction
    # block only, and not negligible (the MS part of the transverse vertex variance of a 500 MeV muon)
    ms = fit["cov"] - fit["cov_hessian"]
    assert torch.allclose(ms, ms.transpose(1, 2), rtol=1e-9, atol=1e-15)
    assert float(torch.linalg.eigvalsh(ms).min()) > -1e-12
    assert bool((ms[:, 5:, :] == 0).all()) and bool((ms[:, :, 5:] == 0).all())
    var_v = torch.diagonal(ms, dim1=1, dim2=2)
    assert bool((var_v[:, :2] > 0.1 * torch.diagonal(fit["cov_hessian"], dim1=1, dim2=2)[:, :2]).all())
    assert bool((var_v[:, 3:5] > 0).all())


def test_float32_hessian_matches_float64_and_finite_differences():
    """The fit's Hessian is computed in the fit's dtype (fitting.reconstruct._fit_batch). Two WCTE muons at
    their truth: the float64 double-backprop Hessian equals central differences of the float64 gradient
    (second method) to 1e-5 of each entry's scale; the float32 Hessian's sigmas (diagonal of H^-1) agree
    with the float64 ones within 1 % (measured 0.2 %), its gradient within 1e-2 sigma (measured 1e-4) and
    its mixed derivatives w.r.t. the track-node offsets within 1 % (measured 0.02 %)."""
    n = 2
    sim, res, resp, like = _direct_only_sim(n, seed=3)
    tr = res["truth"]
    x = torch.cat([tr["vertex"], tr["direction"], tr["energy"].log()[:, None], torch.zeros(n, 1)], 1)
    base = _base_from_x(x.double())
    h = res["hits"]
    obs = hits_to_dense(h.pmt, h.charge.double(), h.time.double(), h.event, n, resp.n_pmts)
    y0 = torch.zeros(n, 7, dtype=F64)
    k = resp.ms_kinks(_local_to_params(y0, base))["s"].shape[1]
    off = torch.zeros(n, k, 6, dtype=F64)
    f64_loc = _local_nll(resp, like, obs, base, F64)
    out = {
        dt: [t.double() for t in _hessian(_local_nll(resp, like, obs, base, dt), y0, off)[1:]]
        for dt in (F64, torch.float32)
    }
    g64, h64, m64 = out[F64]
    g32, h32, m32 = out[torch.float32]
    steps = torch.tensor([1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-4], dtype=F64)
    cols = []
    for j in range(7):
        grads = []
        for sgn in (1.0, -1.0):
            y = y0.clone()
            y[:, j] = sgn * steps[j]
            y.requires_grad_()
            (g,) = torch.autograd.grad(f64_loc(y).sum(), y)
            grads.append(g)
        cols.append((grads[0] - grads[1]) / (2 * steps[j]))
    h_fd = torch.stack(cols, 2)
    d64 = torch.diagonal(h64, dim1=1, dim2=2)
    scale = (d64[:, :, None] * d64[:, None]).sqrt()
    print("max |H - H_fd| / sqrt(H_ii H_jj)", float(((h64 - h_fd).abs() / scale).max()))
    assert float(((h64 - h_fd).abs() / scale).max()) < 1e-5
    c64 = torch.linalg.inv(h64)
    s64 = torch.diagonal(c64, dim1=1, dim2=2).sqrt()
    s32 = torch.diagonal(torch.linalg.inv(h32), dim1=1, dim2=2).sqrt()
    dg = g32 - g64
    dg_sigma = (dg[:, None, :] @ c64 @ dg[:, :, None]).sqrt().flatten()
    print("sigma32/sigma64 - 1", float((s32 / s64 - 1).abs().max()), "grad diff [sigma]", dg_sigma.tolist())
    assert float((s32 / s64 - 1).abs().max()) < 0.01
    assert float(dg_sigma.max()) < 0.01
    assert float((m32 - m64).norm() / m64.norm()) < 0.01


def test_shower_fits_report_the_fisher_covariance():
    """EM cascades: the Raedel-Wiebusch angular density's cusp at the Cherenkov angle (|cos - 1/n|^C, C < 1)
    leaves the NLL once differentiable on small scales, and its observed Hessian spiky (measured on WCTE
    500 MeV electrons: eigenvalues down to -9.5e4 at the fit, where finite differences at 1 cm give +4e4);
    before, 5 of 10 such fits ended 'hessian_not_pd'. PhysicsResponse('e-').hessian_reliable is False, so
    reconstruct polishes by Fisher scoring and reports the inverse expected information (status fisher_cov).
    Six 500 MeV electrons, direct light: at least 5 converge (measured 5; the sixth stops where a Fisher step
    gains nothing at 1, 1/2, 1/4 of its length); every fit has fisher_cov and a covariance equal to the
    inverse of fitting.fisher.event_fisher (the CRB module's expected information) at the reported
    parameters; vertex pulls |fit - truth| / sigma < 4 (measured max 2.4)."""
    from fitting.fisher import event_fisher

    n = 6
    _, res, resp, like = _direct_only_sim(n, seed=3, particle="e-")
    assert resp.hessian_reliable is False
    fit = reconstruct(res["hits"], n, resp, like, "e-", n_starts=1, batch_size=n, dtype=torch.float32)
    st = fit["status"]
    print([status_names(int(x)) for x in st])
    assert int(fit["ok"].sum()) >= n - 1
    assert bool(((st & STATUS["fisher_cov"]) > 0).all())
    assert not bool(((st & STATUS["hessian_not_pd"]) > 0).any())
    p = {k: fit[k] for k in ("vertex", "direction", "energy", "t0")}
    cov_f = torch.linalg.inv(event_fisher(resp, like, p)["F"])
    assert torch.allclose(fit["cov"], cov_f, rtol=1e-6, atol=1e-12)
    pull = (fit["vertex"] - res["truth"]["vertex"].double()) / fit["sigma_vertex"]
    print("vertex pulls", pull.tolist())
    assert float(pull.abs().max()) < 4.0


def test_bad_input_flags_and_errors():
    det, med, sen, opt = _small()
    resp = PhysicsResponse(det, med, sen, "mu-", opt, n_track_nodes=8, fold_wavelength=True)
    like = HitLikelihood(**resp.likelihood_config(), window=(-20.0, 80.0))
    with torch.no_grad():
        pred = resp.expected(
            {
                "vertex": torch.tensor([[0.0, 0.0, -0.4]] * 3, dtype=F64),
                "direction": torch.tensor([[0.0, 0.1, 1.0]] * 3, dtype=F64),
                "energy": torch.full((3,), 300.0, dtype=F64),
            }
        )
    lit = pred["mu"][0] > 0.5
    pm = lit.nonzero()[:, 0]
    m = pm.numel()
    # event 0: good; event 1: one NaN charge; event 2: no hits at all
    pmt = torch.cat([pm, pm])
    ev = torch.cat([torch.zeros(m), torch.ones(m)]).long()
    q = pred["mu"][0][pm].repeat(2).float()
    q[m] = float("nan")
    t = pred["t_mean"][0][pm].repeat(2).float()
    hits = Hits(pmt=pmt, charge=q, time=t, event=ev)
    fit = reconstruct(hits, 3, resp, like, "mu-", n_starts=1, max_iter=10, uncertainties=True)
    names = [status_names(int(s)) for s in fit["status"]]
    print(names)
    assert "bad_input" in names[1] and "no_hits" in names[2]
    assert not bool(fit["ok"][1]) and not bool(fit["ok"][2])
    assert bool(torch.isnan(fit["vertex"][1:]).all())  # not fitted: NaN, never a silent number
    assert torch.isfinite(fit["nll"][0])
    # seed outside the detector -> flagged, replaced by the pre-fit seed, fit still runs
    seeds = {"vertex": torch.tensor([[5.0, 0.0, 0.0]] * 3, dtype=F64)}
    fit2 = reconstruct(
        Hits(pmt=pm, charge=q[:m], time=t[:m], event=torch.zeros(m).long()),
        3,
        resp,
        like,
        "mu-",
        seeds=seeds,
        n_starts=1,
        max_iter=5,
        uncertainties=False,
    )
    assert int(fit2["status"][0]) & STATUS["seed_outside"]
    assert bool(torch.isfinite(fit2["vertex"][0]).all())
    with pytest.raises(ConfigError, match="n_events"):
        reconstruct(hits, 0, resp, like, "mu-")
    with pytest.raises(ConfigError, match="e/mu"):
        reconstruct(hits, 3, resp, like, "e-")
    with pytest.raises(ConfigError, match="optimiser"):
        reconstruct(hits, 3, resp, like, "mu-", optimiser="sgd")
    with pytest.raises(ConfigError, match="'lm' needs forward-mode"):
        reconstruct(hits, 3, resp, like, "e-", optimiser="lm")
    with pytest.raises(ConfigError, match="hits.pmt"):
        reconstruct(Hits(pmt=pmt + 10_000, charge=q, time=t, event=ev), 3, resp, like, "mu-")


def test_response_for_run_indirect_option():
    """physics_response_for_run(indirect_trace=N) (photonfit reconstruct --indirect N): the response models
    the scattered and reflected light as a frozen template of N traced photons; 0 leaves it out; a negative
    count is a ConfigError naming the field."""
    from fitting.reconstruct import physics_response_for_run

    cfg = _direct_only_sim(1, seed=8)[0].config_dict()
    resp = physics_response_for_run(cfg, indirect_trace=100)[0]
    assert resp.indirect is not None and resp.indirect["n_trace"] == 100 and resp.indirect["template"]
    assert physics_response_for_run(cfg)[0].indirect is None
    with pytest.raises(ConfigError, match="indirect_trace"):
        physics_response_for_run(cfg, indirect_trace=-1)


def test_response_for_run_takes_the_runs_medium_scales(tmp_path):
    """A run made with Rayleigh scattering switched off after construction (rayleigh_scale = inf, as the
    direct-light benchmarks and fitting.pid.contained_sample do) records the medium's scales in its config
    (Simulator.config_dict 'medium_scales'; +inf survives the file's JSON), and physics_response_for_run
    (photonfit reconstruct / pid) rebuilds the medium with them: its expected mu equals that of a response
    on the simulator's own stages to 1e-12 relative; without the record (files written before it) the
    preset's Rayleigh scattering attenuates the light (total mu lower by > 0.5 %). A bad value or key is a
    ConfigError naming it."""
    from fitting.reconstruct import physics_response_for_run
    from physics.io import read_run, write_run

    sim, res, resp_sim, _ = _direct_only_sim(1, seed=8)
    src = tmp_path / "ev.h5"
    write_run(src, config=sim.config_dict(), seed=8, truth=res["truth"], hits=res["hits"], n_events=1)
    cfg = read_run(src).config
    assert cfg["medium_scales"]["rayleigh_scale"] == math.inf
    resp = physics_response_for_run(cfg)[0]
    assert float(resp.medium.rayleigh_scale.detach()) == math.inf
    p = _bench_muon()
    with torch.no_grad():
        mu = resp.expected(p)["mu"]
        mu_sim = resp_sim.expected(p)["mu"]
        mu_old = physics_response_for_run({k: v for k, v in cfg.items() if k != "medium_scales"})[0].expected(
            p
        )["mu"]
    assert torch.allclose(mu, mu_sim, rtol=1e-12, atol=0.0)
    assert float(mu_old.sum()) < 0.995 * float(mu.sum())
    for bad, match in (({"rayleigh_scale": -1.0}, "medium_scales.rayleigh_scale"), ({"foo": 1.0}, "foo")):
        with pytest.raises(ConfigError, match=match):
            physics_response_for_run({**cfg, "medium_scales": bad})


def test_response_for_run_takes_the_runs_sensor_values(tmp_path):
    """Sensor values edited after construction (a calibration's per-PMT qe_scale, gain and time offsets; the
    TTS and SPE width) are written with the run (write_run sensors= -> /<run>/sensors; the scalars in
    Simulator.config_dict's sensors), and physics_response_for_run (photonfit reconstruct / pid) rebuilds
    them: expected mu and mean times equal those of a response on the simulator's own stages to 1e-12
    relative, and the likelihood constants are the same; without the per-PMT values the QE edits change mu
    by > 10 % on some PMT and the offsets shift times. Bad values are a ConfigError naming the entry."""
    from fitting.reconstruct import physics_response_for_run
    from physics.io import read_run, write_run

    sim, res, _, _ = _direct_only_sim(1, seed=8)
    n_pmts = sim.detector.n_pmts
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sim.sensors.qe_scale.copy_(0.7 + 0.6 * torch.rand(n_pmts, generator=g))
        sim.sensors.gain.copy_(0.8 + 0.4 * torch.rand(n_pmts, generator=g))
        sim.sensors.time_offset.copy_(2.0 * torch.randn(n_pmts, generator=g))
    sim.sensors.tts_ns, sim.sensors.spe_sigma = 1.3, 0.4
    resp_sim = PhysicsResponse(
        sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    kw = {"config": sim.config_dict(), "seed": 8, "truth": res["truth"], "hits": res["hits"], "n_events": 1}
    run = read_run(write_run(tmp_path / "ev.h5", detector=sim.detector, sensors=sim.sensors, **kw))
    assert run.units["sensors/time_offset"] == "ns" and run.sensors["qe_scale"].shape == (n_pmts,)
    resp = physics_response_for_run(run.config, sensor_values=run.sensors)[0]
    resp_old = physics_response_for_run(run.config)[0]
    for k in ("qe_scale", "gain", "time_offset"):
        assert torch.equal(getattr(resp.sensors, k), getattr(sim.sensors, k))
    assert resp.likelihood_config() == resp_sim.likelihood_config()
    assert resp.likelihood_config()["tts"] == 1.3
    p = _bench_muon()
    with torch.no_grad():
        out, out_sim, out_old = (r.expected(p) for r in (resp, resp_sim, resp_old))
    lit = out_sim["mu"] > 1.0
    assert torch.allclose(out["mu"], out_sim["mu"], rtol=1e-12, atol=0.0)
    assert torch.allclose(out["t_mean"][lit], out_sim["t_mean"][lit], rtol=1e-12, atol=0.0)
    assert float((out_old["mu"][lit] / out_sim["mu"][lit] - 1).abs().max()) > 0.1
    assert float((out_old["t_mean"][lit] - out_sim["t_mean"][lit]).abs().max()) > 1.0
    bad_values = (
        ({**run.sensors, "qe_scale": -run.sensors["qe_scale"]}, r"run sensors\.qe_scale\[0\]"),
        ({"gain": torch.ones(3)}, r"run sensors\.gain"),
        ({"time_offset": torch.full((n_pmts,), math.nan)}, r"run sensors\.time_offset\[0\]"),
        ({"foo": torch.ones(n_pmts)}, "foo"),
    )
    for bad, match in bad_values:
        with pytest.raises(ConfigError, match=match):
            physics_response_for_run(run.config, sensor_values=bad)
    with pytest.raises(ConfigError, match=r"sensors\.gain: got dtype float64 shape"):
        write_run(tmp_path / "bad.h5", detector=sim.detector, sensors={"gain": np.ones(n_pmts + 1)}, **kw)
    assert not (tmp_path / "bad.h5").exists()


def test_response_for_run_takes_the_runs_detector(tmp_path):
    """A run records its detector's PMT table in float64 (Detector.pmt_table), and physics_response_for_run
    with detector_table = RunData.detector builds the response on that table, not on the preset the config
    names: a WCTE whose PMTs are turned 2 degrees about the axis (a survey correction) gives mu equal to a
    response on the turned detector itself to 1e-12 relative; the preset's mu differs by > 10 % on some lit
    PMT."""
    from fitting.reconstruct import physics_response_for_run
    from physics.io import read_run, write_run

    sim, res, _, _ = _direct_only_sim(1, seed=8)
    tab = sim.detector.pmt_table()
    c, s = math.cos(math.radians(2.0)), math.sin(math.radians(2.0))
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    d0 = sim.detector
    turned = Detector(
        d0.name,
        d0.shape,
        d0.radius,
        d0.height,
        tab["pmt_pos"] @ rot.T,
        tab["pmt_normal"] @ rot.T,
        tab["pmt_radius"],
    )
    kw = {"config": sim.config_dict(), "seed": 8, "truth": res["truth"], "hits": res["hits"], "n_events": 1}
    run = read_run(write_run(tmp_path / "ev.h5", detector=turned, **kw))
    assert run.detector["pmt_pos"].dtype == F64
    resp = physics_response_for_run(run.config, detector_table=run.detector)[0]
    resp_preset = physics_response_for_run(run.config)[0]
    resp_turned = PhysicsResponse(
        turned, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    p = _bench_muon()
    with torch.no_grad():
        mu, mu_turned, mu_preset = (r.expected(p)["mu"] for r in (resp, resp_turned, resp_preset))
    assert torch.allclose(mu, mu_turned, rtol=1e-12, atol=0.0)
    lit = mu_turned > 1.0
    assert float((mu_preset[lit] / mu_turned[lit] - 1).abs().max()) > 0.1


@pytest.mark.parametrize("optimiser", ["bfgs", "lm"])
def test_fit_keeps_each_event_on_its_frozen_row(monkeypatch, optimiser):
    """fitting.reconstruct passes each evaluated row's index in the set it froze the response at
    (fitting.response.FROZEN_ROW): through the optimisers' subsets of active events, the BFGS re-centring
    (forced at every step here) and LM's accepted steps, every row must stay the same event. Two 500 MeV
    muons 2 m apart: at every evaluation that carries rows, each row's vertex is nearer to the vertex its
    row was frozen at than to the other event's."""
    import fitting.reconstruct as rec
    from fitting.response import FROZEN_ROW

    parts = [_direct_only_sim(1, seed=31 + i, vertex=(x, 0.0, -1.2)) for i, x in enumerate((-1.0, 1.0))]
    sim = parts[0][0]
    h1, h2 = parts[0][1]["hits"], parts[1][1]["hits"]
    hits = type(h1).cat([h1, type(h2)(**{**h2.__dict__, "event": h2.event + 1})])

    class Spy(PhysicsResponse):
        frozen: torch.Tensor | None = None
        margin = math.inf
        n_rows = 0

        def freeze_indirect(self, event_params):
            self.frozen = event_params["vertex"].detach().double().clone()

        def expected(self, event_params, **kw):
            rows = event_params.get(FROZEN_ROW)
            if rows is not None and self.frozen is not None:
                d = torch.cdist(event_params["vertex"].detach().double(), self.frozen)  # (R, frozen rows)
                own = d.gather(1, rows.long()[:, None])[:, 0]
                other = d.scatter(1, rows.long()[:, None], math.inf).amin(1)
                self.margin = min(self.margin, float((other - own).min()))
                self.n_rows += 1
            return super().expected(event_params, **kw)

    spy = Spy(
        sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    monkeypatch.setattr(rec, "BFGS_REBASE", 1e-9)
    fit = rec.reconstruct(
        hits, 2, spy, parts[0][3], "mu-", n_starts=1, optimiser=optimiser, max_iter=15, dtype=torch.float32
    )
    print(optimiser, "vertices", fit["vertex"].tolist(), "margin", spy.margin, "calls", spy.n_rows)
    assert spy.n_rows > 5
    assert spy.margin > 0.0


def test_cli_reconstruct_writes_file(tmp_path, capsys):
    from physics.io import write_run

    sim, res, _, _ = _direct_only_sim(2, seed=8)
    src = tmp_path / "ev.h5"
    write_run(
        src,
        config=sim.config_dict(),
        seed=8,
        truth=res["truth"],
        hits=res["hits"],
        n_events=2,
        detector=sim.detector,
    )
    p = argparse.ArgumentParser()
    add_reconstruct_parser(p.add_subparsers(dest="command"))
    out = tmp_path / "reco.h5"
    png = tmp_path / "res.png"
    args = p.parse_args(
        [
            "reconstruct",
            str(src),
            "-o",
            str(out),
            "--starts",
            "1",
            "--float32",
            "--max-iter",
            "30",
            "--ms-samples",
            "8",
            "--kink-modes",
            "2",
            "--png",
            str(png),
        ]
    )
    assert args.func(args) == 0
    txt = capsys.readouterr().out
    assert "resolution (68%" in txt
    with h5py.File(out) as f:
        g = f["reco"]
        assert g["vertex"].shape == (2, 3) and g["status"].shape == (2,) and g["cov"].shape == (2, 7, 7)
        assert g["vertex"].attrs["unit"] == "m"
        assert g["straight_vertex"].shape == (2, 3) and g["kink_amplitudes"].shape == (2, 4)
        assert json.loads(g.attrs["meta"])["kink_modes"] == 2
        v = torch.as_tensor(g["vertex"][:])
    assert float((v - res["truth"]["vertex"].double()).norm(dim=-1).max()) < 0.3
    assert png.stat().st_size > 1000
    with pytest.raises(FileExistsError):
        args.func(args)


def test_cli_reconstruct_fits_an_electron_run(tmp_path, capsys):
    """photonfit reconstruct on an electron run fits the EM-cascade model (PhysicsResponse n_depth_nodes),
    not a muon's track: two 500 MeV e- in WCTE, vertices within 30 cm and energies within 10 % of the truth
    (the e- resolution there is ~5 cm and ~2 %, resolution_cpu.json). --ms-samples (a muon's multiple
    scattering) is refused for it with a ConfigError naming the field."""
    from physics.io import write_run

    sim, res, _, _ = _direct_only_sim(2, seed=12, particle="e-")
    src = tmp_path / "ev.h5"
    kw = {"config": sim.config_dict(), "seed": 12, "truth": res["truth"], "hits": res["hits"], "n_events": 2}
    write_run(src, detector=sim.detector, sensors=sim.sensors, **kw)
    p = argparse.ArgumentParser()
    add_reconstruct_parser(p.add_subparsers(dest="command"))
    out = tmp_path / "reco.h5"
    args = p.parse_args(["reconstruct", str(src), "-o", str(out), "--starts", "1", "--float32"])
    assert args.func(args) == 0
    with h5py.File(out) as f:
        g = f["reco"]
        v, e = torch.as_tensor(g["vertex"][:]), torch.as_tensor(g["energy"][:])
        assert json.loads(g.attrs["meta"])["particle"] == "e-"
    assert float((v - res["truth"]["vertex"].double()).norm(dim=-1).max()) < 0.3
    assert float((e / res["truth"]["energy"].double() - 1).abs().max()) < 0.1
    bad = p.parse_args(["reconstruct", str(src), "-o", str(tmp_path / "b.h5"), "--ms-samples", "8"])
    with pytest.raises(ConfigError, match="ms_samples: got 8"):
        bad.func(bad)


def test_ms_over_dispersion_predicts_the_mc_hit_fractions():
    """Multiple-scattering over-dispersion at a fixed truth (300 MC events with Highland kinks, direct light
    only). The MC's PMTs are hit less often than a Poisson count of the model's mean predicts: the sharp
    ring moves from event to event and E[1 - exp(-mu)] < 1 - exp(-E[mu]) (Jensen). The negative binomial
    with PhysicsResponse.ms_relative_variance (sampled kinks) predicts the summed hit fractions of the PMTs
    with 0.02 < P(hit) < 0.98 within 2.5 % and a per-PMT chi^2/ndf below 3.5 (measured: 1.3 % high and 2.3 on
    these 300 events, 2.85 on 400; Poisson 10.7 % high and 14-18). Before the sampled rings kept their
    within-cell spread and renormalised their kinked axes (physics.expected.direct_light_folded) the negative
    binomial was 3.2 % low with chi^2/ndf 3.7-4.4, which these bounds reject. The variance is deterministic
    (common random numbers) and not modelled (None) with ms_samples = 0."""
    from fitting.likelihood import unhit_log_prob

    n = 300
    sim, res, resp, like = _direct_only_sim(n, seed=11)
    assert resp.ms_relative_variance({}) is None  # default ms_samples = 0: Poisson counts
    resp.ms_samples = 32
    d = torch.tensor(DIR, dtype=F64)
    p = {
        "vertex": torch.tensor([VTX], dtype=F64),
        "direction": (d / d.norm())[None],
        "energy": torch.tensor([500.0], dtype=F64),
        "t0": torch.zeros(1, dtype=F64),
    }
    with torch.no_grad():
        mu = resp.expected(p)["mu"][0]
        w = resp.ms_relative_variance(p)[0]
        assert torch.equal(w, resp.ms_relative_variance(p)[0])
    cfg = resp.likelihood_config()
    m = mu + float(like.mu_dark)
    frac = torch.bincount(res["hits"].pmt, minlength=resp.n_pmts).double() / n
    out = {}
    for name, mv in (("poisson", None), ("nb", w * mu * mu)):
        ph = -torch.expm1(unhit_log_prob(m, cfg["spe_rel_var"], cfg["threshold"], 1.0, mv))
        sel = (ph > 0.02) & (ph < 0.98)
        z = (frac - ph)[sel] / torch.sqrt(ph * (1 - ph) / n)[sel]
        out[name] = (float(ph[sel].sum() / frac[sel].sum()) - 1.0, float((z * z).mean()))
    print(out)
    assert out["poisson"][0] > 0.06 and out["poisson"][1] > 10  # the over-dispersion is there
    assert abs(out["nb"][0]) < 0.025 and out["nb"][1] < 3.5
    resp.ms_samples = 0
    assert resp.ms_relative_variance(p) is None
    with pytest.raises(ConfigError, match="ms_samples"):
        PhysicsResponse(
            sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, fold_wavelength=True, ms_samples=1
        )


def test_antithetic_kink_sets_cancel_the_linear_term():
    """PhysicsResponse.ms_kink_expectations(antithetic=True): set S/2 + j is set j with its kinks negated, so
    a pair's mean departs from the straight sharp track only at second order in the kinks, and a single set
    at first order. With the radiation length x1e6 (Highland kinks ~1000x smaller, ~0.01 deg: small against
    the sharp ring's edge) the pair means' rms departure is below 0.05 of the single sets' (measured
    0.011); independent sets paired the same way keep ~1/sqrt(2) of it (measured 0.74). (At the real
    radiation length the response is far from linear: the antithetic pairs keep 0.64 of it, 0.80 at x100,
    0.13 at x1e4.) An odd number of antithetic sets is refused."""
    _, _, resp, _ = _direct_only_sim(1, seed=1)
    resp.medium.radiation_length = resp.medium.radiation_length * 1e6
    resp.ms_samples = 16
    d = torch.tensor(DIR)
    p = {
        "vertex": torch.tensor([VTX]),
        "direction": (d / d.norm())[None],
        "energy": torch.tensor([500.0]),
        "t0": torch.zeros(1),
    }
    with torch.no_grad():
        straight = resp._expected({**p, "node_offset": torch.zeros(1, 32, 6)}, True)["mu"][0].double()
        ratio = {}
        for anti in (True, False):
            m = resp.ms_kink_expectations(p, antithetic=anti)[0].double()
            single = (m - straight).pow(2).sum(1).mean().sqrt()
            pair = (0.5 * (m[:8] + m[8:]) - straight).pow(2).sum(1).mean().sqrt()
            ratio[anti] = float(pair / single)
    print(ratio)
    assert ratio[True] < 0.05
    assert ratio[False] > 0.4
    resp.ms_samples = 15
    with pytest.raises(ConfigError, match="ms_samples: got 15 with antithetic"):
        resp.ms_kink_expectations(p, antithetic=True)


@functools.lru_cache(maxsize=2)  # shared by the slow closure tests (one fit of 48 events per setting)
def _closure_pulls(n: int, seed: int, ms_samples: int = 0):
    sim, res, resp, like = _direct_only_sim(n, seed=seed)
    resp.ms_samples = ms_samples
    fit = reconstruct(
        res["hits"], n, resp, like, "mu-", n_starts=2, batch_size=16, max_iter=50, dtype=torch.float32
    )
    hess = dict(fit)
    hess["cov"] = fit["cov_hessian"]
    return fit, resolutions(fit, res["truth"])["summary"], resolutions(hess, res["truth"])["summary"]


@pytest.mark.slow
def test_closure_bias_and_pulls():
    """48 contained 500 MeV muons (MC with Highland multiple scattering, direct light only).

    Pure-Hessian pulls are too wide (MS: the light comes from a wandering track, the truth is the initial
    vertex/direction; with MS switched off in the MC they are 1.03-1.11, 96 events). The reported covariance
    adds the fit's own linear response to the track's kinks (fitting.uncertainty.kink_response_covariance).
    Measured (this seed): Hessian only x 2.08, y 2.61, z 1.29, dir 1.87/1.66, log E 1.08; reported x 0.89,
    y 1.21, z 0.89, dir 0.95/0.83, log E 1.08 (the earlier straight-line-fit
    MS model gave dir 0.44/0.38). Asserted: converged; MS matters (Hessian-only transverse pull width > 1.4);
    reported vertex and direction pull widths in [0.7, 1.35] (48 events: +-10 % statistical) and narrower
    than Hessian-only; |vertex/direction bias| < 3 sigma_stat + 2 cm / 0.3 deg; |energy bias| < 4%.
    The issue's floor (1 +- 0.15 and unbiased everywhere) is NOT met: test_closure_pull_floor_all_coordinates
    (xfail)."""
    n = 48
    fit, s, sh = _closure_pulls(n, seed=101)
    print("reported", s)
    print("hessian only pull std", sh["pull_std"])
    assert s["n_ok"] >= n - 2
    for k in ("x", "y", "z"):
        assert abs(s["bias"][k]) < 3 * s["bias_err"][k] + 0.02
    for k in ("x", "y", "z", "dir_a", "dir_b"):
        assert 0.7 < s["pull_std"][k] < 1.35, (k, s["pull_std"][k])
    for k in ("x", "y", "dir_a", "dir_b"):
        assert s["pull_std"][k] < sh["pull_std"][k]
    for k in ("dir_a", "dir_b"):
        assert abs(s["bias"][k]) < 3 * s["bias_err"][k] + math.radians(0.3)
    assert abs(s["bias"]["log_e"]) < 0.04
    assert min(sh["pull_std"]["x"], sh["pull_std"]["y"]) > 1.4  # MS matters: Hessian alone under-covers


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 3 floor not met: the pull means. With the MS over-dispersion (ms_samples=32), 96 events "
    "(results/closure_pulls_cpu_nb.json): every pull width 0.92-1.10 (std; log E 1.06), but means z +0.84 "
    "and log E +0.21 (+0.33 %) against 2/sqrt(96) = 0.20. Poisson counts (results/closure_pulls_cpu.json): "
    "log E width 1.22, means z +0.81, log E -0.19. The z bias appears once the transverse vertex and the "
    "direction are free (benchmarks/closure_bias_decomposition.py), and the model's own noiseless kink sets "
    "reproduce it (--asimov-sets: +0.73 cm of the MC's +1.03). An MC without MS fitted with the MC's "
    "own physics (32 events, results/closure_pulls_noms_cpu.json): every width 0.97-1.07, log E 1.00",
)
def test_closure_pull_floor_all_coordinates():
    """The issue's floor: pull width 1 +- 0.15 and |pull mean| < 2 / sqrt(n) for x, y, z, both direction
    angles and log E (48 events, the fit with the multiple-scattering over-dispersion)."""
    n = 48
    _, s, _ = _closure_pulls(n, seed=101, ms_samples=32)
    print(s)
    for k, w in s["pull_std"].items():
        assert abs(w - 1.0) < 0.15, (k, w)
        assert abs(s["pull_mean"][k]) < 2.0 / math.sqrt(s["n_ok"]), (k, s["pull_mean"][k])


def _random_contained_muons(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n 500 MeV muons (float64) from uniform vertices in WCTE's inner box (+-0.6, +-0.6, +-0.8) m along
    isotropic directions, t0 = 0: the pruning tests' events."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(n, 3, generator=g, dtype=F64) - 0.5) * torch.tensor([1.2, 1.2, 1.6], dtype=F64)
    d = torch.randn(n, 3, generator=g, dtype=F64)
    return {
        "vertex": v,
        "direction": d / d.norm(dim=-1, keepdim=True),
        "energy": torch.full((n,), 500.0, dtype=F64),
        "t0": torch.zeros(n, dtype=F64),
    }


def test_grouped_pruning_bound_matches_per_row_bound():
    """prune_group (physics.expected.direct_light_folded): copies of one straight track bent by different
    kink offsets share one pruning bound, evaluated once per group; the sharp-ring light equals the per-row
    pruned evaluation (float64, to 1e-9 p.e.), and a group that does not divide E is a ValueError."""
    sim, _, resp, _ = _direct_only_sim(1, seed=3)
    p = _random_contained_muons(3, seed=5)
    g = 4
    rep = {k: v.repeat_interleave(g, 0) for k, v in p.items()}
    gen = torch.Generator().manual_seed(2)
    off = 0.02 * torch.randn(3 * g, resp.n_track_nodes, 6, generator=gen, dtype=F64)
    ep = {**rep, "node_offset": off}
    with torch.no_grad():
        one = resp._expected(ep, True, 1)["mu"]
        grp = resp._expected(ep, True, g)["mu"]
    assert float(one.sum()) > 100.0
    assert torch.allclose(grp, one, rtol=0.0, atol=1e-9)
    with pytest.raises(ValueError, match="prune_group"):
        resp._expected({k: v[:5] for k, v in ep.items()}, True, g)


def test_kinked_sharp_ring_is_the_rotated_straight_track(monkeypatch):
    """A finite kink in node_offset (physics.expected._offset_products) turns the emission axis, it does not
    shrink the ring: every node of a 300 MeV muon turned by dd = tan(phi) u (u transverse, phi = 0.2 rad,
    the size of the sampled kinks at a stopping end) and displaced onto the rotated line gives the light of
    the straight track along cos(phi) d + sin(phi) u (sharp rings, float64, unpruned): mu and t_mean equal to
    1e-9. The unnormalised axis d + dd (|d + dd| = 1 / cos(phi)) shrank every ring by ~1.3 deg and fails."""
    monkeypatch.setitem(px.direct_light_folded.__kwdefaults__, "prune_mu", None)
    _, _, resp, _ = _direct_only_sim(1, seed=3)
    d = torch.tensor([[0.1, -0.2, 1.0]], dtype=F64)
    d = d / d.norm()
    u = torch.linalg.cross(d, torch.tensor([[1.0, 0.0, 0.0]], dtype=F64))
    u = u / u.norm()
    phi = 0.2
    rot = math.cos(phi) * d + math.sin(phi) * u
    p = {
        "vertex": torch.tensor([[0.1, 0.0, -0.4]], dtype=F64),
        "direction": d,
        "energy": torch.tensor([300.0], dtype=F64),
        "t0": torch.zeros(1, dtype=F64),
    }
    s = resp.ms_kinks(p)["s"][0]  # the nodes' positions along the track
    k = s.numel()
    off = torch.cat([s[:, None] * (rot - d), math.tan(phi) * u.expand(k, 3)], 1)[None]
    with torch.no_grad():
        kinked = resp.expected({**p, "node_offset": off}, sharp_rings=True)
        straight = resp.expected({**p, "direction": rot}, sharp_rings=True)
    lit = straight["mu"] > 1e-6
    assert float(straight["mu"].sum()) > 100.0
    assert torch.allclose(kinked["mu"], straight["mu"], rtol=1e-9, atol=1e-12)
    assert float((kinked["t_mean"] - straight["t_mean"])[lit].abs().max()) < 1e-9


def test_pruned_folded_kernel_matches_full_sum(monkeypatch):
    """The (event, PMT) pruning of expected.direct_light_folded (pairs whose bound on the direct light is
    below PRUNE_MU are skipped) against the unpruned sum (prune_mu=None), float64, WCTE,
    random contained 500 MeV muons: mu equal to 1e-10 p.e. (the dark-noise mean per PMT is ~2e-4), t_mean
    equal where mu > 1e-6, NLL gradients equal to 1e-8, and fewer than half of the pairs evaluated."""
    cfg = SimConfig(detector="wcte", particle="mu-", energy=500.0, vertex=VTX, direction=DIR)
    sim = Simulator(cfg)
    resp = PhysicsResponse(
        sim.detector, sim.medium, sim.sensors, "mu-", sim.optics, n_track_nodes=32, fold_wavelength=True
    )
    events = _random_contained_muons(4, seed=11)
    outs = {}
    for z in (px.PRUNE_MU, None):
        monkeypatch.setitem(px.direct_light_folded.__kwdefaults__, "prune_mu", z)
        p = dict(events)
        p["vertex"] = events["vertex"].clone().requires_grad_()
        p["direction"] = events["direction"].clone().requires_grad_()
        o = resp.expected(p)
        # a likelihood-like scalar: Poisson term + mu-weighted times
        scal = (o["mu"] - 3.0 * torch.log(o["mu"] + 2e-4)).sum() + (
            o["mu"] * (o["t_mean"] + o["t_var"])
        ).sum()
        outs[z] = (o, torch.autograd.grad(scal, [p["vertex"], p["direction"]]))
    (op, gp), (of, gf) = outs[px.PRUNE_MU], outs[None]
    lit = of["mu"] > 1e-6
    kept = float((op["mu"] > 0).double().mean())
    print("kept", kept, "max dmu", float((op["mu"] - of["mu"]).detach().abs().max()))
    assert float((op["mu"] - of["mu"]).abs().max()) < 1e-10
    assert float((op["t_mean"] - of["t_mean"])[lit].abs().max()) < 1e-9
    assert float((op["t_var"] - of["t_var"])[lit].abs().max()) < 1e-9
    for a, b in zip(gp, gf, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-8
    assert kept < 0.5


@pytest.mark.parametrize("groups", [1, 3])
def test_pruning_bound_covers_the_direct_light(monkeypatch, groups):
    """The bound that decides the pruning (expected._light_bound) is an upper bound on every (event, PMT)
    pair's folded direct light: float64, WCTE, direct light only, 6 random contained 500 MeV muons, the
    unpruned mu (prune_mu=None) never above the bound, and the bound tight on the lit pairs (within 40 % of
    mu where mu > 1 p.e.: it leaves out the attenuation, exp(-d / L_abs) ~ 0.95 over WCTE's metres, and
    majorises the ring kernel's Bessel factor, up to 1.55x on the widest rings: measured 1.31 at most; 1.2
    with the exact Bessel factor); with one wavelength band and with three."""
    _, _, resp, _ = _direct_only_sim(1, seed=12)  # direct light only, folded, K = 32
    resp.colour_groups = groups
    p = _random_contained_muons(6, seed=12)
    bounds = []
    bound_fn = px._light_bound

    def record(*args, **kw):
        out = bound_fn(*args, **kw)
        bounds.append(out)
        return out

    monkeypatch.setattr(px, "_light_bound", record)
    with torch.no_grad():
        resp.expected(p)
        monkeypatch.setitem(px.direct_light_folded.__kwdefaults__, "prune_mu", None)
        mu = resp.expected(p)["mu"]
    bound = torch.cat(bounds, 0)
    assert bound.shape == mu.shape
    assert bool((mu <= bound * (1.0 + 1e-9) + 1e-300).all()), float((mu - bound).max())
    lit = mu > 1.0
    assert int(lit.sum()) > 50
    assert float((bound[lit] / mu[lit]).max()) < 1.4, float((bound[lit] / mu[lit]).max())


def test_i0e_majorant_bounds_the_bessel_factor():
    """expected.i0e_majorant, the pruning bound's stand-in for the ring kernel's i0e(x) = exp(-x) I_0(x):
    never below torch's i0e on 1e-8 <= x <= 1e9 (float64, 200k log-spaced points), tight at large x (within
    1e-4 above x = 1e3, the sharp rings) and within 1.6x everywhere; the shift it uses is needed (with the
    asymptotic series' pi/2 instead of 2.1 it falls below i0e near x ~ 2)."""
    x = torch.logspace(-8, 9, 200_001, dtype=F64)
    exact = torch.special.i0e(x)
    ratio = px.i0e_majorant(x) / exact
    assert float(ratio.min()) >= 1.0
    assert float(ratio.max()) < 1.6
    assert float(ratio[x > 1e3].max()) < 1.0 + 1e-4
    loose = torch.rsqrt((2.0 * math.pi * x - math.pi / 2).clamp_min(1.0))
    assert float((loose / exact).min()) < 0.98


def test_optimisers_reach_the_same_minimum():
    """The default per-event BFGS (Fisher-matrix start), Fisher-scoring LM and torch L-BFGS on the same 2
    events and NLL: all converge to the same minimum (NLL within 1e-3, all end with the float64 Newton
    step; vertices within 1 mm); LM needs at most 20 Jacobians; BFGS's batched value+gradient evaluations
    plus 4 for its one Fisher Jacobian (~3.5 evaluations) are fewer than L-BFGS's."""
    sim, res, resp, like = _direct_only_sim(2, seed=3)
    fits, evals = {}, {}
    for opt in ("bfgs", "lm", "lbfgs"):
        trace: list[float] = []
        fits[opt] = reconstruct(
            res["hits"],
            2,
            resp,
            like,
            "mu-",
            n_starts=1,
            batch_size=2,
            max_iter=40,
            dtype=torch.float32,
            optimiser=opt,
            trace=trace,
        )
        evals[opt] = len(trace)
    print("evals", evals, "nll", {k: v["nll"].tolist() for k, v in fits.items()})
    ref = fits["bfgs"]
    for opt, fit in fits.items():
        assert bool(fit["ok"].all()), opt
        assert float((fit["nll"] - ref["nll"]).abs().max()) < 1e-3, opt
        assert float((fit["vertex"] - ref["vertex"]).norm(dim=-1).max()) < 1e-3, opt
    assert evals["lm"] <= 20
    assert evals["bfgs"] + 4 < evals["lbfgs"]


def test_bfgs_turns_the_direction_by_60_degrees():
    """Seeds 60 deg from the true direction (vertex, energy from the truth), one start each, 8 events: the
    fit turns through the re-centring of ``_optimise_bfgs`` (at atan(BFGS_REBASE) = 27 deg) and must reach
    the minimum found from the pre-fit seed (NLL within 1e-3) in at least 7 of them. Not all: from 60 deg
    the vertex can walk into a false basin (measured: 0-1 of these 8 events, depending on the float32
    rounding of the 2-thread reductions; in float64 1 of the 2 events of seed 3 does), the reason the
    default fit runs two starts."""
    n = 8
    sim, res, resp, like = _direct_only_sim(n, seed=3)
    tr = res["truth"]
    d = tr["direction"].double()
    perp = torch.linalg.cross(d, torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).expand(n, 3))
    perp = perp / perp.norm(dim=-1, keepdim=True)
    seeds = {
        "vertex": tr["vertex"].double(),
        "direction": 0.5 * d + math.sqrt(0.75) * perp,
        "energy": tr["energy"].double(),
        "t0": torch.zeros(n, dtype=F64),
    }
    kw = dict(n_starts=1, batch_size=n, max_iter=60, dtype=torch.float32)
    turned = reconstruct(res["hits"], n, resp, like, "mu-", seeds=seeds, **kw)
    ref = reconstruct(res["hits"], n, resp, like, "mu-", **kw)
    angle = torch.rad2deg(torch.arccos((turned["direction"] * d).sum(-1).clamp(-1, 1)))
    print("dnll", (turned["nll"] - ref["nll"]).tolist(), "angle to truth", angle.tolist())
    same = (turned["nll"] - ref["nll"]).abs() < 1e-3
    assert int(same.sum()) >= n - 1, same.tolist()
    assert bool((angle[same] < 3.0).all()), angle.tolist()


# a 1 GeV muon (CSDA range 4.74 m) whose end lies 3 cm before WCTE's top cap along its direction
CORNER_VTX, CORNER_DIR = (-1.251, -0.69, -1.717), (0.55, 0.30, 0.78)


def _corner_muons(n: int, seed: int):
    return _direct_only_sim(n, seed, energy=1000.0, vertex=CORNER_VTX, direction=CORNER_DIR)


def test_contained_energy_range_reaches_the_wall():
    """PhysicsResponse.contained_energy: the CSDA range of the returned energy (physics.emission.csda_range)
    is the distance from the vertex to the wall along the direction (0.2 %); a vertex outside gives 0;
    showers are not modelled (None)."""
    from physics.emission import csda_range
    from physics.expected import wall_exit_distance

    sim, _, resp, _ = _corner_muons(1, seed=1)
    v = torch.tensor([CORNER_VTX, [0.0, 0.0, 0.0], [0.3, -0.2, 1.0], [0.0, 0.0, 3.0]], dtype=F64)
    d = torch.tensor([CORNER_DIR, [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]], dtype=F64)
    d = d / d.norm(dim=-1, keepdim=True)
    p = {"vertex": v, "direction": d, "energy": torch.full((4,), 500.0, dtype=F64), "t0": torch.zeros(4)}
    e = resp.contained_energy(p)
    det = sim.detector
    dist = wall_exit_distance(v, d, det.shape, float(det.radius), det.height)
    print("energies", e.tolist(), "distances", dist.tolist())
    rng = csda_range("mu-", e[:3], sim.medium)
    assert torch.allclose(rng, dist[:3], rtol=2e-3)
    assert float(e[3]) == 0.0
    shower = PhysicsResponse(det, sim.medium, sim.sensors, "e-", sim.optics, n_depth_nodes=4)
    assert shower.contained_energy(p) is None


def test_track_fitted_past_the_wall_is_restarted(monkeypatch):
    """Three 1 GeV muons stopping 3 cm before WCTE's top cap, fitted from an energy 30 % too high: the track
    then runs ~1.4 m past the wall, where its light is cut, and the NLL is almost flat in energy. Without
    the restart (WALL_RESTART = inf) at least two of the three fits stay more than 10 % high; with it (the
    refit from the energy whose range ends at the wall, response.contained_energy) every fit ends within 8 %
    of the truth, the stuck ones at an NLL lower by more than 2 (beyond 2 sigma for one parameter) and
    flagged start = n_starts, and no fit is worse. Measured (float32): without the restart +27.6, +13.3 and
    +11.5 %; with it +1.4, +7.0 and +2.3 %, NLL lower by 35.7, 9.7 and 13.1 (2026-11-24; an earlier model
    gave +5.3 % and 21.0 for the second). (Where the no-restart fits stop on this flat NLL moves with small
    model changes: before the folded kernel's colour terms they stopped at +27.5, +20.7 and +2.2 %.) Such
    fits end with status end_at_wall (test_track_reaching_the_wall_is_flagged)."""
    import fitting.reconstruct as rc

    _, res, resp, like = _corner_muons(3, seed=7)
    tr = res["truth"]
    seeds = {
        **{k: tr[k] for k in ("vertex", "direction")},
        "energy": tr["energy"] * 1.3,
        "t0": torch.zeros(3),
    }

    def fit():
        return reconstruct(res["hits"], 3, resp, like, "mu-", seeds=seeds, n_starts=1, dtype=torch.float32)

    with_restart = fit()
    monkeypatch.setattr(rc, "WALL_RESTART", math.inf)
    without = fit()
    de = with_restart["energy"] / tr["energy"] - 1.0
    de0 = without["energy"] / tr["energy"] - 1.0
    print(
        "dE with restart",
        de.tolist(),
        "without",
        de0.tolist(),
        "dNLL",
        (without["nll"] - with_restart["nll"]).tolist(),
    )
    stuck = de0 > 0.10
    assert int(stuck.sum()) >= 2
    assert bool((de.abs() < 0.08).all())
    assert bool((with_restart["nll"] < without["nll"] - 2.0)[stuck].all())
    assert bool((with_restart["nll"] <= without["nll"] + 1e-3).all())
    assert bool((with_restart["start"][stuck] == 1).all()) and without["start"].tolist() == [0, 0, 0]


def test_track_reaching_the_wall_is_flagged():
    """Status end_at_wall (fitting.reconstruct): 1 GeV muons from the centre of WCTE towards the barrel
    (CSDA range 4.7 m, 1.6 m to the wall: the wall-limited energy of contained_energy is 442 MeV) leave the
    tank, so their light says only that the range reaches the wall: every fit is flagged, its energy at
    least the wall-limited one (a lower limit; measured 657 and 669 MeV for the true 1000 on one host, 546
    and 1421 MeV with that fit's vertex 1.5 m off on CI's: an exiting track is not what the fit is built
    for, and where it ends on its flat NLL depends on the float32 reduction order; both flagged and ok). A
    fit whose vertex left the detector would be failed (outside) instead: the test asks that no fit be ok
    and unflagged, and at least one be flagged. Contained 500 MeV muons (range ending 0.4 m before the cap,
    wall-limited energy 698 MeV) are not flagged, and their vertices are within 10 cm."""
    from fitting.reconstruct import STATUS

    for kw, at_wall in (
        ({"energy": 1000.0, "vertex": (0.0, 0.0, 0.0), "direction": (1.0, 0.2, 0.1)}, True),
        ({"energy": 500.0}, False),
    ):
        _, res, resp, like = _direct_only_sim(2, seed=21, **kw)
        tr = res["truth"]
        fit = reconstruct(res["hits"], 2, resp, like, "mu-", dtype=torch.float32)
        p = {k: tr[k].double() for k in ("vertex", "direction", "energy")}
        cap = resp.contained_energy({**p, "t0": torch.zeros(2, dtype=F64)})
        flag = (fit["status"] & STATUS["end_at_wall"]) > 0
        print(kw, "E fit", fit["energy"].tolist(), "wall-limited", cap.tolist(), "flag", flag.tolist())
        if at_wall:  # never an ok, unflagged answer (a vertex fitted outside would fail the fit instead)
            assert bool((p["energy"] > 1.5 * cap).all())  # the true track leaves the tank
            assert bool((flag | ~fit["ok"]).all())
            assert int(flag.sum()) >= 1
            assert bool((fit["energy"].double() > 0.98 * cap)[flag].all())
        else:
            assert flag.tolist() == [False, False] and bool(fit["ok"].all())
            assert float((fit["vertex"].double() - p["vertex"]).norm(dim=-1).max()) < 0.1


def test_resolutions_separate_fits_at_the_wall():
    """fitting.reconstruct.resolutions: ok fits flagged end_at_wall are counted, and the energy 68 % of the
    other ok fits is the numpy quantile of their |E/E_true - 1| (failed fits excluded from both)."""
    from fitting.reconstruct import STATUS, resolutions

    g = torch.Generator().manual_seed(4)
    n = 40
    de = 0.05 * torch.randn(n, generator=g, dtype=F64)
    wall = torch.rand(n, generator=g) < 0.3
    ok = torch.rand(n, generator=g) < 0.8
    de = torch.where(wall, 0.5 + de.abs(), de)  # the flagged fits far off: they must not enter
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64).expand(n, 3)
    fit = {
        "vertex": torch.zeros(n, 3, dtype=F64),
        "direction": d,
        "e1": torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).expand(n, 3),
        "e2": torch.tensor([[0.0, 1.0, 0.0]], dtype=F64).expand(n, 3),
        "energy": 500.0 * (1.0 + de),
        "cov": torch.eye(7, dtype=F64).expand(n, 7, 7),
        "ok": ok,
        "status": STATUS["converged"] | torch.where(wall, STATUS["end_at_wall"], 0),
    }
    truth = {
        "vertex": torch.zeros(n, 3, dtype=F64),
        "direction": d,
        "energy": torch.full((n,), 500.0, dtype=F64),
    }
    r = resolutions(fit, truth)
    s = r["summary"]
    assert s["n_ok"] == int(ok.sum()) and s["n_end_at_wall"] == int((ok & wall).sum()) > 0
    assert r["end_at_wall"].tolist() == (ok & wall).tolist()
    ref = np.quantile(de[ok & ~wall].abs().numpy(), 0.68)
    assert s["energy_68_frac_not_at_wall"] == pytest.approx(ref, rel=1e-9)
    assert s["energy_68_frac"] > s["energy_68_frac_not_at_wall"]  # the flagged ones widen the whole


def test_fisher_polish_survives_an_overflowing_step(monkeypatch):
    """A near-singular Fisher matrix gives a scoring step whose energy overflows (exp of ~1e10): the polish
    leaves such an event where it is (finite parameters, no exception), as a 40-event SK 200 MeV muon cell
    of benchmarks/bench_resolution.py needed (it raised ConfigError for a NaN/inf energy before)."""
    import fitting.reconstruct as rc

    _, res, resp, like = _direct_only_sim(1, seed=4)
    resp, like = resp.double(), like.double()
    h = res["hits"]
    obs = hits_to_dense(h.pmt.long(), h.charge.double(), h.time.double(), h.event.long(), 1, resp.n_pmts)
    tr = res["truth"]
    x = torch.cat(
        [
            tr["vertex"].double(),
            tr["direction"].double(),
            tr["energy"].double().log()[:, None] - 0.1,
            torch.zeros(1, 1),
        ],
        1,
    ).double()
    monkeypatch.setattr(rc, "event_fisher", lambda *a, **k: {"F": 1e-12 * torch.eye(7, dtype=F64)[None]})
    x_out, nll, _, converged, _ = rc._fisher_polish(resp, like, rc._nll_fn(resp, like, obs), x, 2, 0.1)
    assert bool(torch.isfinite(x_out).all()) and torch.equal(x_out, x)
    assert bool(torch.isfinite(nll).all()) and not bool(converged.any())


# --------------------------------------------------------------------------------------------------------
def _bent_objective(fit, resp, like, obs, n_modes: int):
    """The bent stage's objective rebuilt from reconstruct's outputs: f(u) per event, u (E,7+2M) = (vertex
    shift [m], tangent angles along the reported e1 / e2 [rad], d log E, d t0 [ns], kink-mode amplitudes)
    about the reported bent fit; the kink modes are those of the straight fit's track (straight_*)."""
    from fitting.uncertainty import kink_mode_offsets, kink_modes

    xs = torch.cat(
        [
            fit["straight_vertex"],
            fit["straight_direction"],
            fit["straight_energy"].log()[:, None],
            fit["straight_t0"][:, None],
        ],
        1,
    )
    b = _base_from_x(xs)
    p0 = {"vertex": b["v"], "direction": b["d"], "energy": b["loge"].exp(), "t0": b["t0"]}
    kinks = resp.ms_kinks(p0)
    km = kink_modes(kinks["s"], kinks["var"], n_modes)

    def f(u: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """The objective (len(rows),) of the events rows (default all) at u (len(rows),7+2M)."""
        r = list(range(fit["vertex"].shape[0])) if rows is None else rows
        e1, e2 = fit["e1"][r], fit["e2"][r]
        d = fit["direction"][r] + u[:, 3:4] * e1 + u[:, 4:5] * e2
        amp = fit["kink_amplitudes"][r] + u[:, 7:]
        p = {
            "vertex": fit["vertex"][r] + u[:, :3],
            "direction": d / d.norm(dim=-1, keepdim=True),
            "energy": fit["energy"][r] * torch.exp(u[:, 5]),
            "t0": fit["t0"][r] + u[:, 6],
            "node_offset": kink_mode_offsets(amp, km["turn"][r], km["disp"][r], e1, e2),
            "node_ms": km["rest"][r],
        }
        return like(resp.expected_kinked(p), {k: v[r] for k, v in obs.items()}) + 0.5 * (amp**2).sum(1)

    return f


def test_bent_stage_is_a_minimum_of_the_kinked_posterior_and_keeps_the_straight_fit():
    """reconstruct(kink_modes=3) on 3 contained 500 MeV muons (float64): the straight fit it keeps
    (straight_*) is the plain reconstruction's to 1e-9; every event is refined (status bit 'bent'); the
    reported NLL is the bent objective (data NLL of the bent track + |a|^2 / 2) rebuilt independently from
    the reported parameters and amplitudes (to 1e-8 relative); it lies below the objective of the straight
    fit with zero amplitudes; the point is a minimum: the Newton decrement g^T H^-1 g of the rebuilt
    objective, with H from torch.autograd.functional.hessian per event (a second Hessian code), is < 0.05
    and H is positive definite; and cov_hessian is the event block of that H^-1 (the marginal over the
    amplitudes) to 2 % (it is the Hessian before the final Newton step); cov adds the response to the kinks
    outside the modes: its vertex and direction variances are larger, its log E and t0 ones equal."""
    m = 3
    sim, res, resp, like = _direct_only_sim(3, seed=21)
    resp, like = resp.double(), like.double()
    kw = dict(n_starts=1, batch_size=3, max_iter=60, dtype=torch.float64)
    plain = reconstruct(res["hits"], 3, resp, like, "mu-", **kw)
    fit = reconstruct(res["hits"], 3, resp, like, "mu-", kink_modes=m, **kw)
    assert bool(((fit["status"] & STATUS["bent"]) > 0).all()), [status_names(int(s)) for s in fit["status"]]
    assert bool(fit["ok"].all())
    for k in ("vertex", "direction", "energy", "t0", "nll", "cov"):
        torch.testing.assert_close(fit["straight_" + k], plain[k], rtol=1e-9, atol=1e-12)
    h = res["hits"]
    obs = hits_to_dense(h.pmt.long(), h.charge.double(), h.time.double(), h.event.long(), 3, resp.n_pmts)
    f = _bent_objective(fit, resp, like, obs, m)
    n_par = 7 + 2 * m
    with torch.no_grad():
        at_fit = f(torch.zeros(3, n_par, dtype=F64))
        u_straight = torch.zeros(3, n_par, dtype=F64)
        u_straight[:, 7:] = -fit["kink_amplitudes"]
        fs = fit["straight_vertex"] - fit["vertex"]
        u_straight[:, :3] = fs
        # the straight direction in the reported tangent angles: d_s = normalise(d + a e1 + b e2)
        ds = fit["straight_direction"] / (fit["straight_direction"] * fit["direction"]).sum(1, keepdim=True)
        u_straight[:, 3] = (ds * fit["e1"]).sum(1)
        u_straight[:, 4] = (ds * fit["e2"]).sum(1)
        u_straight[:, 5] = (fit["straight_energy"] / fit["energy"]).log()
        u_straight[:, 6] = fit["straight_t0"] - fit["t0"]
        at_straight = f(u_straight)
    torch.testing.assert_close(at_fit, fit["nll"], rtol=1e-8, atol=0.0)
    print("bent objective at the fit", at_fit.tolist(), "at the straight fit", at_straight.tolist())
    assert bool((at_fit < at_straight - 1.0).all())
    for i in range(3):

        def fi(u: torch.Tensor, i: int = i) -> torch.Tensor:
            return f(u[None], [i])[0]

        u0 = torch.zeros(n_par, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(fi(u0), u0)
        hess = torch.autograd.functional.hessian(fi, torch.zeros(n_par, dtype=F64), vectorize=True)
        ev = torch.linalg.eigvalsh(hess)
        dec = float(g @ torch.linalg.solve(hess, g))
        cov7 = torch.linalg.inv(hess)[:7, :7]
        rel = (fit["cov_hessian"][i].diagonal() / cov7.diagonal() - 1).abs().max()
        print(
            f"event {i}: decrement {dec:.2e}, min eigenvalue {float(ev[0]):.3g}, "
            f"cov diag rel {float(rel):.2e}"
        )
        assert float(ev[0]) > 0
        assert dec < 0.05
        assert float(rel) < 0.02
    extra = fit["cov"].diagonal(dim1=1, dim2=2) - fit["cov_hessian"].diagonal(dim1=1, dim2=2)
    assert bool((extra[:, :5] > 0).all()) and float(extra[:, 5:].abs().max()) == 0.0


def test_kink_modes_bad_input():
    """kink_modes: negative, above the track nodes, for a cascade or without uncertainties -> ConfigError
    naming the field."""
    sim, res, resp, like = _direct_only_sim(1, seed=5)
    for bad in (-1, 33):
        with pytest.raises(ConfigError, match="kink_modes: got"):
            reconstruct(res["hits"], 1, resp, like, "mu-", kink_modes=bad)
    with pytest.raises(ConfigError, match="kink_modes: got 2"):
        reconstruct(res["hits"], 1, resp, like, "mu-", kink_modes=2, uncertainties=False)
    _, res_e, resp_e, like_e = _direct_only_sim(1, seed=5, particle="e-")
    with pytest.raises(ConfigError, match="kink_modes: got 2 for particle 'e-'"):
        reconstruct(res_e["hits"], 1, resp_e, like_e, "e-", kink_modes=2)
