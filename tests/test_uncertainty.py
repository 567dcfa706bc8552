"""Multiple-scattering covariance of the straight-track fit (fitting.uncertainty) and its response hook.

Independent expectations: Highland's closed form (PDG eq. 34.16) for the summed kink variances; a Monte-Carlo
of the scattered track itself (physics.emission.track_steps with multiple scattering, no photons) fitted step
by step with the same weights, whose empirical covariance the quadrature must reproduce within its
statistical error.
"""

from __future__ import annotations

import math

import pytest
import torch

from fitting.response import PhysicsResponse
from fitting.uncertainty import (
    cartesian_to_local,
    highland_kink_variance,
    kink_modes,
    kink_response_covariance,
    sampled_track_fit,
    track_fit_weights,
    track_ms_covariance,
)
from physics.config import ConfigError
from physics.constants import MUON_MASS
from physics.emission import track_steps
from physics.geometry import Detector
from physics.medium import Medium
from physics.sensors import PMTResponse

F64 = torch.float64
VTX, DIR = (0.0, 0.0, -1.2), (0.2, 0.1, 1.0)  # contained 500 MeV muon in WCTE (as the closure test)


@pytest.fixture(scope="module")
def wcte():
    det = Detector.load("wcte")
    med = Medium.load("water")
    sen = PMTResponse.load("default", n_pmts=det.n_pmts)
    return det, med, sen


def _kw(det, med, sen, weighting):
    return dict(
        particle="mu-",
        medium=med,
        wall=(det.shape, det.radius, det.height),
        weighting=weighting,
        pmt_radius=float(det.pmt_radius.double().mean()),
        detection=sen.quantum_efficiency,
    )


def test_kink_variances_sum_to_highland():
    """At fixed momentum the per-cell increments telescope to Highland's theta0^2(L) (PDG eq. 34.16):
    theta0 = 13.6 MeV/(beta c p) sqrt(L/X0) (1 + 0.038 ln(L/(X0 beta^2))), for 1 GeV mu over 1 m of water."""
    x0, mass, t = 0.3608, 105.6583755, 1000.0
    edges = torch.linspace(0.0, 1.0, 201, dtype=F64)
    kin = torch.full((200,), t, dtype=F64)
    v = highland_kink_variance(edges[:-1], edges[1:], kin, mass, x0).sum()
    p = math.sqrt(t * (t + 2 * mass))
    beta = p / (t + mass)
    th0 = 13.6 / (beta * p) * math.sqrt(1.0 / x0) * (1 + 0.038 * math.log(1.0 / (x0 * beta * beta)))
    print(f"sum {float(v):.6e} vs Highland {th0 * th0:.6e}")
    assert abs(float(v) / th0**2 - 1) < 1e-9


@pytest.mark.parametrize("weighting", ["positional", "likelihood"])
def test_quadrature_matches_sampled_scattered_tracks(wcte, weighting):
    """1500 scattered 500 MeV muon tracks (track_steps, Highland MS): the empirical covariance of the fitted
    (offset, angle) along both transverse axes agrees with the quadrature within 4 standard errors + 3%
    (cell discretisation); the offset-angle correlation within 0.04."""
    det, med, sen = wcte
    n = 1500
    gen = torch.Generator().manual_seed(7)
    v = torch.tensor([VTX], dtype=F64).expand(n, 3)
    d = torch.tensor([DIR], dtype=F64)
    d = (d / d.norm()).expand(n, 3)
    e = torch.full((n,), 500.0, dtype=F64)
    steps = track_steps("mu-", 500.0, v, d, med, gen, dtype=F64)
    kw = _kw(det, med, sen, weighting)
    p, (u1, u2) = sampled_track_fit(steps, v, d, e, **kw)
    emp = torch.cov(p.T)
    cov8 = track_ms_covariance(v[:1], d[:1], e[:1], **kw)[0]
    tm = torch.zeros(8, 4, dtype=F64)
    tm[0:3, 0], tm[0:3, 1], tm[3:6, 2], tm[3:6, 3] = u1[0], u2[0], u1[0], u2[0]
    model = tm.T @ cov8 @ tm
    se = math.sqrt(2.0 / (n - 1))
    for i in range(4):
        r = float(emp[i, i] / model[i, i])
        print(f"{weighting} var[{i}]: sampled/quadrature {r:.4f} (sd {math.sqrt(float(model[i, i])):.4g})")
        assert abs(r - 1) < 4 * se + 0.03
    for i, j in ((0, 2), (1, 3), (0, 1), (2, 3), (0, 3), (1, 2)):  # all correlations (axes couple via W)
        c_emp = float(emp[i, j] / (emp[i, i] * emp[j, j]).sqrt())
        c_mod = float(model[i, j] / (model[i, i] * model[j, j]).sqrt())
        print(f"{weighting} corr[{i},{j}] {c_emp:.3f} vs {c_mod:.3f}")
        assert abs(c_emp - c_mod) < 0.04 + 4 * (1 - c_mod**2) / math.sqrt(n)


def test_covariance_structure_and_scaling(wcte):
    """Symmetric PSD; vertex block transverse to the track (d^T C d = 0); log E, t0 rows zero; a 2 GeV muon
    (stiffer, 13.6/(beta p) smaller) scatters less in angle than a 300 MeV one."""
    det, med, sen = wcte
    d = torch.tensor([DIR, DIR, (1.0, 0.0, 0.0)], dtype=F64)
    v = torch.tensor([VTX, VTX, (-1.5, 0.0, 0.0)], dtype=F64)
    e = torch.tensor([300.0, 2000.0, 500.0], dtype=F64)
    c = track_ms_covariance(v, d, e, **_kw(det, med, sen, "likelihood"))
    assert c.shape == (3, 8, 8)
    assert torch.allclose(c, c.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(c).min()) > -1e-12
    dn = d / d.norm(dim=-1, keepdim=True)
    for blk in (slice(0, 3), slice(3, 6)):
        long = torch.einsum("ei,eij,ej->e", dn, c[:, blk, blk], dn)
        assert float(long.abs().max()) < 1e-12
    assert float(c[:, 6:, :].abs().max()) == 0.0
    ang = torch.diagonal(c[:, 3:6, 3:6], dim1=1, dim2=2).sum(-1)
    print("angle variance 300 MeV / 2 GeV:", ang.tolist())
    assert float(ang[1]) < float(ang[0])
    f = track_fit_weights(v, d, e, **_kw(det, med, sen, "likelihood"))
    assert f["metric"].shape == (3, 96, 4, 4) and bool(torch.isfinite(f["metric"]).all())


def test_cartesian_to_local_projects_direction():
    """A direction-change covariance along e1 appears as Var(a) only; the vertex block is unchanged."""
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    e2 = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    c8 = torch.zeros(1, 8, 8, dtype=F64)
    c8[0, 3, 3] = 4e-4
    c8[0, 0, 0] = 1e-3
    c8[0, 0, 3] = 5e-4
    c8[0, 3, 0] = 5e-4
    loc = cartesian_to_local(c8, e1, e2)[0]
    assert float(loc[3, 3]) == pytest.approx(4e-4) and float(loc[4, 4]) == 0.0
    assert float(loc[0, 0]) == pytest.approx(1e-3) and float(loc[0, 3]) == pytest.approx(5e-4)


def test_track_ms_covariance_bad_input(wcte):
    """track_ms_covariance: a muon gets a positive vertex and direction variance; bad particle / weighting
    raise ConfigError."""
    det, med, sen = wcte
    params = {
        "vertex": torch.tensor([VTX, VTX], dtype=F64),
        "direction": torch.tensor([DIR, DIR], dtype=F64),
        "energy": torch.tensor([500.0, 500.0], dtype=F64),
        "t0": torch.zeros(2, dtype=F64),
    }
    e1 = torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=F64)
    e2 = torch.tensor([[0.0, 1.0, 0.0]] * 2, dtype=F64)
    good = {k: x[:1] for k, x in params.items()}
    cov = track_ms_covariance(
        good["vertex"],
        good["direction"],
        good["energy"],
        particle="mu-",
        medium=med,
        wall=(det.shape, det.radius, det.height),
        pmt_radius=float(det.pmt_radius.double().mean()),
        detection=sen.quantum_efficiency,
    )
    loc = cartesian_to_local(cov, e1[:1], e2[:1])
    assert float(loc[0, 0, 0]) > 1e-5 and float(loc[0, 3, 3]) > 1e-6
    with pytest.raises(ConfigError, match="particle"):
        track_ms_covariance(
            good["vertex"], good["direction"], good["energy"], particle="e-", medium=med, wall=None
        )
    with pytest.raises(ConfigError, match="weighting"):
        track_ms_covariance(
            good["vertex"],
            good["direction"],
            good["energy"],
            particle="mu-",
            medium=med,
            wall=None,
            weighting="bogus",
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(wcte):
    det, med, sen = wcte
    v = torch.tensor([VTX], dtype=F64)
    d = torch.tensor([DIR], dtype=F64)
    e = torch.tensor([500.0], dtype=F64)
    c_cpu = track_ms_covariance(v, d, e, **_kw(det, med, sen, "likelihood"))
    c_gpu = track_ms_covariance(
        v.cuda(), d.cuda(), e.cuda(), **_kw(det.to("cuda"), med.to("cuda"), sen.to("cuda"), "likelihood")
    )
    assert c_gpu.device.type == "cuda"
    assert torch.allclose(c_gpu.cpu(), c_cpu, rtol=1e-6, atol=1e-12)


def test_ms_kinks_of_the_response(wcte):
    """PhysicsResponse.ms_kinks: per-cell Highland kink variances of the fitted track. Their sum along the
    track agrees with the accumulated theta0^2 of the expected model's nodes (muon_track_nodes:
    momentum-dependent rate integrated along the path, log term of the total path; a different quadrature of
    the same law) within 10 % at the last node, grows along the track, and is None where no kinks are
    modelled (showers, ms_covariance=False, the exact wavelength sum)."""
    from physics import emission
    from physics import expected as px

    det, med, sen = wcte
    p = {
        "vertex": torch.tensor([VTX], dtype=F64),
        "direction": torch.tensor([DIR], dtype=F64),
        "energy": torch.tensor([500.0], dtype=F64),
    }
    mu = PhysicsResponse(det, med, sen, "mu-", n_track_nodes=32, fold_wavelength=True)
    k = mu.ms_kinks(p)
    assert k["s"].shape == (1, 32) and k["var"].shape == (1, 32)
    assert bool((k["var"] > 0).all()) and bool((k["s"].diff(dim=1) > 0).all())
    wl, _ = mu._wavelength_nodes(F64, torch.device("cpu"))
    nodes = px.muon_track_nodes(
        p["energy"],
        MUON_MASS,
        float(med.refractive_index(wl).max()),
        32,
        lambda kin: emission.bethe_dedx(kin, MUON_MASS, med, spin_half=True),
        med.radiation_length,
    )
    assert torch.equal(k["path"], nodes["path"])  # the nodes' path lengths along the scattered track
    acc = torch.cumsum(k["var"], 1) - 0.5 * k["var"]
    print("kink variance sum", float(acc[0, -1]), "theta0^2 at the last node", float(nodes["theta2"][0, -1]))
    assert float(acc[0, -1]) == pytest.approx(float(nodes["theta2"][0, -1]), rel=0.1)
    off = PhysicsResponse(det, med, sen, "mu-", fold_wavelength=True, ms_covariance=False)
    assert off.ms_kinks(p) is None
    assert PhysicsResponse(det, med, sen, "mu-", fold_wavelength=False).ms_kinks(p) is None
    assert PhysicsResponse(det, med, sen, "e-", n_depth_nodes=4).ms_kinks(p) is None


def test_kink_modes_rest_is_the_covariance_the_modes_leave() -> None:
    """kink_modes against a Monte-Carlo of the kinks it expands (K = 24 cells, uneven variances): with
    z ~ N(0, I) and the modes' amplitudes a = U^T z (U = T^-1 turn, orthonormal), the remainders
    T z - turn a and D z - disp a (T, D built here by cumulative sums, as PhysicsResponse.ms_kink_expectations
    bends its tracks) have the per-node moments ``rest`` (within 4 standard errors) and are uncorrelated
    with a. m = 0 tends to the Brownian closed forms Var(phi) = theta2, Cov(u, phi) = theta2 s / 2,
    Var(u) = theta2 s^2 / 3 (uniform cells: within 2 % beyond the first quarter of 400); m = K leaves 0;
    a bad m raises ConfigError."""
    gen = torch.Generator().manual_seed(3)
    k, m, n = 24, 4, 100_000
    var = (1e-4 * (0.5 + torch.rand(1, k, generator=gen, dtype=torch.float64))).cumsum(1).flip(1)
    s = torch.cumsum(0.05 + 0.05 * torch.rand(1, k, generator=gen, dtype=torch.float64), 1)
    km = kink_modes(s, var, m)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64)
    kap = z * var.sqrt()
    before = torch.cumsum(kap, 1) - kap
    turn = before + 0.5 * kap  # (n,K)
    disp = s * before - (torch.cumsum(kap * s, 1) - kap * s)
    t_mat = (torch.tril(torch.ones(k, k, dtype=torch.float64), -1) + 0.5 * torch.eye(k)) * var[0].sqrt()
    u = torch.linalg.solve(t_mat, km["turn"][0])  # (K,M)
    assert torch.allclose(u.T @ u, torch.eye(m, dtype=torch.float64), atol=1e-10)
    a = z @ u
    rt = turn - a @ km["turn"][0].T
    rd = disp - a @ km["disp"][0].T
    for i, (x, y) in enumerate(((rt, rt), (rt, rd), (rd, rd))):
        mc = (x * y).mean(0)
        err = (x * y).std(0) / math.sqrt(n)
        assert bool(((mc - km["rest"][0, :, i]).abs() < 4 * err + 1e-15).all()), i
    corr = (a.T @ rt) / n / (rt.std(0)[None] + 1e-30)
    assert float(corr.abs().max()) < 5 / math.sqrt(n)
    # m = 0: the Brownian limit of uniform cells
    kk = 400
    v0 = torch.full((1, kk), 2e-6, dtype=torch.float64)
    s0 = (torch.arange(kk, dtype=torch.float64)[None] + 0.5) * 0.01
    rest = kink_modes(s0, v0, 0)["rest"][0]
    th2 = v0[0].cumsum(0) - 0.5 * v0[0]  # midpoint accumulated variance
    brown = torch.stack([th2, th2 * s0[0] / 2, th2 * s0[0] ** 2 / 3], -1)
    assert torch.allclose(rest[kk // 4 :], brown[kk // 4 :], rtol=0.02)
    assert float(kink_modes(s0[:, :24], v0[:, :24], 24)["rest"].abs().max()) < 1e-15
    with pytest.raises(ConfigError, match="kink modes m"):
        kink_modes(s, var, k + 1)


def test_kink_response_covariance_of_the_kinks_a_fit_leaves_out() -> None:
    """kink_response_covariance against a Monte Carlo of the linear response it stands for: n = 11 fitted
    coordinates (7 event + 4 kink-mode amplitudes), random H^-1 and mixed derivatives d^2 NLL / dtheta
    d(node offset), K = 16 cells. Kinks kappa = sqrt(var) z per axis (z ~ N(0, I)) bend the track (nodes
    after a kink turn by it and move by it times their distance, the kinked node half: built here by
    cumulative sums), the fit moves by -H^-1 sum_j mixed_j offset_j; with fitted_modes U (kink_modes' basis,
    M = 3) only (I - U U^T) z enters. The sample covariance of the vertex and direction block (200 000 kink
    sets, both axes) matches within 3 %; the rows beyond 5 are zero; M = 0 gives the covariance without
    modes and M = K gives 0."""
    gen = torch.Generator().manual_seed(11)
    f64 = torch.float64
    k, n_par, m, n = 16, 11, 3, 200_000
    var = 1e-4 * (0.5 + torch.rand(1, k, generator=gen, dtype=f64))
    s = torch.cumsum(0.05 + 0.1 * torch.rand(1, k, generator=gen, dtype=f64), 1)
    a = torch.randn(1, n_par, n_par, generator=gen, dtype=f64)
    hinv = a @ a.transpose(1, 2) / n_par + 0.1 * torch.eye(n_par, dtype=f64)
    mixed = torch.randn(1, n_par, k, 6, generator=gen, dtype=f64)
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=f64)
    e2 = torch.tensor([[0.0, 0.6, 0.8]], dtype=f64)
    basis = kink_modes(s, var, m)["basis"]
    cov = kink_response_covariance(hinv, mixed, s, var, e1, e2, basis)[0]
    shift = torch.zeros(n, n_par, dtype=f64)
    u = basis[0]
    for ax in (e1[0], e2[0]):
        z = torch.randn(n, k, generator=gen, dtype=f64)
        z = z - (z @ u) @ u.T
        kap = z * var.sqrt()
        before = torch.cumsum(kap, 1) - kap
        turn = before + 0.5 * kap
        disp = s * before - (torch.cumsum(kap * s, 1) - kap * s)
        off = torch.cat([disp[..., None] * ax, turn[..., None] * ax], -1)  # (n,K,6)
        shift = shift - torch.einsum("ij,jkc,nkc->ni", hinv[0], mixed[0], off)
    mc = shift.T @ shift / n
    rel = (cov[:5, :5] - mc[:5, :5]).abs().max() / mc[:5, :5].diagonal().max()
    assert float(rel) < 0.03, float(rel)
    assert float(cov[5:].abs().max()) == 0.0 and float(cov[:, 5:].abs().max()) == 0.0
    no_modes = kink_response_covariance(hinv, mixed, s, var, e1, e2)
    zero_modes = kink_response_covariance(hinv, mixed, s, var, e1, e2, kink_modes(s, var, 0)["basis"])
    torch.testing.assert_close(zero_modes, no_modes, rtol=1e-12, atol=0.0)
    all_modes = kink_response_covariance(hinv, mixed, s, var, e1, e2, kink_modes(s, var, k)["basis"])
    assert float(all_modes.abs().max()) < 1e-12 * float(no_modes.abs().max())
