"""PMTResponse: detection probabilities, thinning, charge/time digitisation, dark noise, threshold, configs.

Expectations are computed independently (numpy/scipy on the YAML tables, closed forms), never by calling
the code under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml
from scipy import integrate, stats

from physics.config import ConfigError, config_dir
from physics.records import CathodeHits, PhotoElectrons
from physics.sensors import PMTResponse


def _cfg(name: str = "default") -> dict:
    return yaml.safe_load((config_dir() / "sensors" / f"{name}.yaml").read_text())


def _hits(n: int, n_pmts: int, g: torch.Generator, wl=(280.0, 660.0), cos=(0.0, 1.0), n_events: int = 10):
    wl0, wl1 = wl
    c0, c1 = cos
    return CathodeHits(
        pmt=torch.randint(0, n_pmts, (n,), generator=g),
        t=10 * torch.rand(n, generator=g, dtype=torch.float64),
        wavelength=wl0 + (wl1 - wl0) * torch.rand(n, generator=g, dtype=torch.float64),
        cos_incidence=c0 + (c1 - c0) * torch.rand(n, generator=g, dtype=torch.float64),
        event=torch.randint(0, n_events, (n,), generator=g).sort().values,
        indirect=torch.zeros(n, dtype=torch.bool),
    )


def _pe(pmt, event, t) -> PhotoElectrons:
    return PhotoElectrons(pmt=pmt, t=t, event=event, dark=torch.zeros(len(pmt), dtype=torch.bool))


def _spe_trunc_moments(sigma: float) -> tuple[float, float]:
    """Mean and variance of N(1, sigma^2) truncated at 0 (scipy), i.e. before normalisation to mean 1."""
    d = stats.truncnorm(a=-1.0 / sigma, b=np.inf, loc=1.0, scale=sigma)
    return float(d.mean()), float(d.var())


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    "preset,wl,cos", [("default", (280.0, 660.0), (0.0, 1.0)), ("20inch", (250.0, 700.0), (-0.5, 1.0))]
)
def test_detected_fraction_equals_mean_qe_ce_acceptance(preset, wl, cos):
    cfg = _cfg(preset)
    n_pmts, n = 40, 400_000
    s = PMTResponse(cfg, n_pmts)
    g = torch.Generator().manual_seed(11)
    scale = 0.8 + 0.4 * torch.rand(n_pmts, generator=g)
    with torch.no_grad():
        s.qe_scale.copy_(scale)
    h = _hits(n, n_pmts, g, wl, cos)
    pe = s.detect(h, g)
    frac = len(pe) / n
    # closed form: wavelength uniform on [wl0, wl1] -> <QE> = (trapezoid integral of the table)/(wl1-wl0),
    # QE = 0 outside the table; cos uniform on [c0, 1] with A = 0 for cos < 0 -> <A> = int_0^1 A / (1 - c0)
    # with int_0^1 sum c_k x^k dx = sum c_k/(k+1); pmt uniform -> <qe_scale> = mean over PMTs.
    wl_tab = np.array(cfg["qe"]["wavelength_nm"], float)
    qe_tab = np.array(cfg["qe"]["efficiency"], float)
    mean_qe = np.trapezoid(qe_tab, wl_tab) / (wl[1] - wl[0])
    c = np.array(cfg["angular_acceptance"]["coefficients"], float)
    mean_acc = (c / (np.arange(c.size) + 1)).sum() / c.sum() / (cos[1] - cos[0])
    expect = mean_qe * float(scale.double().mean()) * cfg["collection_efficiency"] * mean_acc
    sigma = math.sqrt(expect * (1 - expect) / n)
    assert abs(frac - expect) < 5 * sigma, (frac, expect, sigma)
    # pointwise: the probability equals the numpy evaluation of the same tables
    p = s.detection_probability(h.wavelength[:2000], h.cos_incidence[:2000], h.pmt[:2000]).detach().numpy()
    w, cc = h.wavelength[:2000].numpy(), h.cos_incidence[:2000].numpy()
    qe = np.where((w >= wl_tab[0]) & (w <= wl_tab[-1]), np.interp(w, wl_tab, qe_tab), 0.0)
    acc = np.where(cc > 0, np.polynomial.polynomial.polyval(np.clip(cc, 0, 1), c) / c.sum(), 0.0)
    ref = np.clip(qe * scale.numpy()[h.pmt[:2000].numpy()] * cfg["collection_efficiency"] * acc, 0, 1)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)


def test_max_detection_probability_is_the_tight_bound():
    s = PMTResponse(_cfg("20inch"), 5)
    with torch.no_grad():
        s.qe_scale.copy_(torch.tensor([0.9, 1.0, 1.3, 1.1, 0.7]))
    pmax = s.max_detection_probability()
    wl = torch.linspace(250, 700, 901, dtype=torch.float64)
    cs = torch.linspace(-1, 1, 801, dtype=torch.float64)
    W, C = torch.meshgrid(wl, cs, indexing="ij")
    p = s.detection_probability(W.reshape(-1), C.reshape(-1), torch.full((W.numel(),), 2)).detach()
    assert float(p.max()) <= pmax * (1 + 1e-9)
    assert float(p.max()) >= pmax * (1 - 1e-3)
    # independent: QE peak 0.211 (table) x 1.3 x CE 0.7 x A(1) = 1 (the cubic is increasing on [0, 1])
    assert pmax == pytest.approx(0.211 * 1.3 * 0.7, rel=1e-6)


def test_thinning_equivalence_and_guard():
    s = PMTResponse(_cfg("default"), 30)
    g = torch.Generator().manual_seed(3)
    n = 400_000
    h = _hits(n, 30, g)
    pmax = s.max_detection_probability()
    full = len(s.detect(h, g, thin=1.0))
    pre = torch.rand(n, generator=g) < pmax  # emission-time pre-thinning
    thinned = len(s.detect(h.select(pre), g, thin=pmax))
    mean_p = float(s.detection_probability(h.wavelength, h.cos_incidence, h.pmt).detach().mean())
    sd = math.sqrt(n * mean_p * (1 - mean_p))
    assert abs(full - n * mean_p) < 5 * sd
    assert abs(thinned - n * mean_p) < 5 * sd
    assert abs(full - thinned) < 5 * math.sqrt(2) * sd
    with pytest.raises(ConfigError, match="thin"):
        s.detect(h, g, thin=0.5 * pmax)
    with pytest.raises(ConfigError, match="thin"):
        s.detect(h, g, thin=1.5)


def test_detection_probability_gradient_wrt_qe_scale():
    s = PMTResponse(_cfg("default"), 4)
    wl = torch.tensor([400.0, 450.0], dtype=torch.float64)
    cos = torch.tensor([1.0, 1.0], dtype=torch.float64)
    p = s.detection_probability(wl, cos, torch.tensor([1, 3]))
    p.sum().backward()
    # dp/dscale = QE * CE * A; QE(400) = 0.25, QE(450) = (0.2227 + 0.1979)/2 from the table
    g = s.qe_scale.grad
    assert g[1].item() == pytest.approx(0.25 * 0.9, rel=1e-6)
    assert g[3].item() == pytest.approx(0.5 * (0.2227 + 0.1979) * 0.9, rel=1e-5)
    assert g[0].item() == 0 and g[2].item() == 0


# ------------------------------------------------------------------------------------------ digitisation


@pytest.mark.parametrize("family,sigma", [("gaussian", 0.6), ("lognormal", 0.4)])
def test_charge_is_compound_poisson(family, sigma):
    cfg = _cfg("default")
    cfg["spe"] = {"family": family, "sigma": sigma}
    cfg["threshold_pe"] = 0.0
    s = PMTResponse(cfg, 3)
    g = torch.Generator().manual_seed(5)
    n_ev, lam = 40_000, 3.0
    k = torch.poisson(torch.full((n_ev,), lam), generator=g).long()
    event = torch.repeat_interleave(torch.arange(n_ev), k)
    pe = _pe(torch.full_like(event, 1), event, torch.zeros(len(event), dtype=torch.float64))
    hits, d = s.digitize(pe, n_ev, g)
    q = d["charge"]
    tot = np.bincount(hits.event.numpy(), weights=hits.charge.detach().double().numpy(), minlength=n_ev)
    # independent relative SPE variance s^2 (scipy truncnorm, or the log-normal closed form)
    if family == "gaussian":
        m, v = _spe_trunc_moments(sigma)
        rel_var = v / m**2
    else:
        rel_var = sigma**2
    exp_mean, exp_var = lam, lam * (1 + rel_var)
    assert abs(q.detach().double().mean().item() - 1.0) < 5 * math.sqrt(rel_var / len(q))
    assert abs(tot.mean() - exp_mean) < 5 * math.sqrt(exp_var / n_ev)
    m4 = np.mean((tot - tot.mean()) ** 4)
    se_var = math.sqrt((m4 - tot.var() ** 2) / n_ev)
    assert abs(tot.var() - exp_var) < 5 * se_var, (tot.var(), exp_var, se_var)
    if family == "gaussian":  # truncation matters at sigma 0.6: rel_var != sigma^2 beyond the errors
        assert abs(tot.var() - lam * (1 + sigma**2)) > 3 * se_var


def test_gain_scales_charge_and_gradient():
    cfg = _cfg("default")
    cfg["threshold_pe"] = 0.0
    s = PMTResponse(cfg, 2)
    with torch.no_grad():
        s.gain.copy_(torch.tensor([1.0, 2.5]))
    g = torch.Generator().manual_seed(9)
    n = 20_000
    pe = _pe(torch.randint(0, 2, (n,), generator=g), torch.arange(n), torch.zeros(n))
    hits, d = s.digitize(pe, n, g)
    q = d["charge"]
    raw = q.detach() / s.gain.detach()[pe.pmt]
    assert abs(q.detach()[pe.pmt == 1].mean().item() / 2.5 - 1) < 0.02
    hits.charge.sum().backward()
    expect = [raw[pe.pmt == 0].sum(), raw[pe.pmt == 1].sum()]
    np.testing.assert_allclose(s.gain.grad.numpy(), expect, rtol=1e-4)


def test_first_hit_time_is_minimum_of_gaussians():
    cfg = _cfg("default")
    cfg["threshold_pe"] = 0.0
    cfg["tts_ns"] = 1.5
    s = PMTResponse(cfg, 4)
    with torch.no_grad():
        s.time_offset.copy_(torch.tensor([0.0, 0.0, 2.0, 0.0]))
    g = torch.Generator().manual_seed(21)
    n_ev, n_pe, t0, tts = 20_000, 5, 10.0, 1.5
    event = torch.arange(n_ev).repeat_interleave(n_pe)
    pe = _pe(torch.full_like(event, 2), event, torch.full((len(event),), t0, dtype=torch.float64))
    hits, _ = s.digitize(pe, n_ev, g)
    assert len(hits) == n_ev
    x = (hits.time.detach().numpy() - t0 - 2.0) / tts

    # closed form: density of min of n standard normals n phi(x) (1 - Phi(x))^(n-1)
    def dens(u):
        return n_pe * stats.norm.pdf(u) * stats.norm.sf(u) ** (n_pe - 1)

    e1 = integrate.quad(lambda u: u * dens(u), -np.inf, np.inf)[0]
    e2 = integrate.quad(lambda u: u * u * dens(u), -np.inf, np.inf)[0]
    sd = math.sqrt(e2 - e1 * e1)
    assert e1 == pytest.approx(-1.16296, abs=1e-4)  # tabulated expected minimum of 5 normals
    assert abs(x.mean() - e1) < 5 * sd / math.sqrt(n_ev)
    ks = stats.kstest(x, lambda u: 1 - stats.norm.sf(u) ** n_pe)
    assert ks.pvalue > 1e-3, ks


def test_threshold_removes_expected_fraction():
    cfg = _cfg("20inch")  # gaussian sigma 0.5, threshold 0.25 p.e.
    s = PMTResponse(cfg, 100)
    g = torch.Generator().manual_seed(8)
    n_ev = 2000
    event = torch.arange(n_ev).repeat_interleave(100)
    pmt = torch.arange(100).repeat(n_ev)
    hits, _ = s.digitize(_pe(pmt, event, torch.zeros(len(pmt))), n_ev, g)
    removed = 1 - len(hits) / len(pmt)
    # closed form: q = X / E[X], X ~ N(1, 0.5^2) truncated at 0 -> P(q < thr) = F_X(thr * E[X])
    sig, thr = 0.5, 0.25
    m, _ = _spe_trunc_moments(sig)
    p = stats.truncnorm(a=-1 / sig, b=np.inf, loc=1, scale=sig).cdf(thr * m)
    assert abs(removed - p) < 5 * math.sqrt(p * (1 - p) / len(pmt)), (removed, p)
    assert (hits.charge >= thr).all()


def test_digitize_groups_by_event_and_pmt_and_is_reproducible():
    pe = _pe(
        torch.tensor([3, 3, 7, 3, 7, 1]),
        torch.tensor([0, 0, 0, 1, 1, 1]),
        torch.tensor([5.0, 1.0, 2.0, 4.0, 3.0, 0.5]),
    )
    cfg = _cfg("default")
    cfg["tts_ns"], cfg["threshold_pe"] = 0.0, 0.0
    s = PMTResponse(cfg, 10)
    hits, d = s.digitize(pe, 2, torch.Generator().manual_seed(4))
    q = d["charge"]
    assert torch.equal(d["t"], pe.t) and torch.equal(d["pmt"], pe.pmt)  # tts 0, offsets 0
    assert hits.event.tolist() == [0, 0, 1, 1, 1] and hits.pmt.tolist() == [3, 7, 1, 3, 7]
    assert hits.time.tolist() == [1.0, 2.0, 0.5, 4.0, 3.0]
    np.testing.assert_allclose(hits.charge.detach().numpy()[0], (q[0] + q[1]).item(), rtol=1e-6)
    hits2, _ = s.digitize(pe, 2, torch.Generator().manual_seed(4))
    assert torch.equal(hits.charge, hits2.charge)


# ------------------------------------------------------------------------------------------ dark noise


def test_dark_noise_rate_and_uniformity():
    cfg = _cfg("default")
    cfg["dark_rate_hz"] = 2000.0
    n_pmts, n_ev, window = 500, 5000, (-200.0, 800.0)
    s = PMTResponse(cfg, n_pmts)
    g = torch.Generator().manual_seed(13)
    d = s.dark_noise(n_ev, window, g)
    mean_per_ev = 2000.0 * 1000e-9 * n_pmts  # R * T * P = 1.0
    n = len(d)
    assert abs(n - n_ev * mean_per_ev) < 5 * math.sqrt(n_ev * mean_per_ev)
    counts = np.bincount(d.event.numpy(), minlength=n_ev)
    assert abs(counts.var() / counts.mean() - 1) < 5 * math.sqrt(2 / n_ev)  # Poisson dispersion
    t = d.t.numpy()
    assert t.min() >= -200 and t.max() <= 800
    assert abs(t.mean() - 300.0) < 5 * 1000 / math.sqrt(12 * n)
    hist = np.bincount(d.pmt.numpy() // 25, minlength=20)
    chi2 = ((hist - n / 20) ** 2 / (n / 20)).sum()
    assert stats.chi2.sf(chi2, 19) > 1e-4
    assert d.dark.all() and (d.event[1:] >= d.event[:-1]).all()


# ------------------------------------------------------------------------------------------ configs


def _mutate(path, value):
    cfg = copy.deepcopy(_cfg("default"))
    node = cfg
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("collection_efficiency",), 1.5, "collection_efficiency"),
        (("collection_efficiency",), "high", "collection_efficiency"),
        (("qe", "wavelength_nm"), [280, 300, 290] + list(range(320, 660, 20)) + [660], "wavelength_nm"),
        (("qe", "efficiency"), [0.1, 0.2], "efficiency"),
        (("qe", "efficiency"), [0.0] * 19 + [1.2], r"efficiency\[19\]"),
        (("spe", "family"), "weibull", "spe.family"),
        (("spe", "sigma"), -0.1, "spe.sigma"),
        (("tts_ns",), -1.0, "tts_ns"),
        (("threshold_pe",), -0.2, "threshold_pe"),
        (("dark_rate_hz",), KeyError, "dark_rate_hz"),
        (("angular_acceptance", "kind"), "spline", "angular_acceptance.kind"),
        (("angular_acceptance", "coefficients"), [-1.0, 0.5], "angular_acceptance.coefficients"),
        (("colour",), "blue", "colour"),
    ],
)
def test_invalid_configs_raise_config_error_naming_field(path, value, field):
    with pytest.raises(ConfigError, match=field):
        PMTResponse(_mutate(path, value), 10)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="n_pmts"):
        PMTResponse(_cfg(), 0)
    with pytest.raises(ConfigError, match="sensors: preset"):
        PMTResponse.load("no_such_pmt", 3)
    s = PMTResponse(_cfg(), 3)
    with pytest.raises(ConfigError, match="window_ns"):
        s.dark_noise(3, (10.0, 5.0), torch.Generator())
    with pytest.raises(ConfigError, match="pe.pmt"):
        s.digitize(_pe(torch.tensor([5]), torch.tensor([0]), torch.zeros(1)), 1, torch.Generator())


def test_table_acceptance_and_summary():
    cfg = _cfg("default")
    cfg["angular_acceptance"] = {"kind": "table", "cos": [0.0, 0.5, 1.0], "coefficients": [0.2, 0.8, 1.0]}
    s = PMTResponse(cfg, 2)
    a = s.acceptance(torch.tensor([-0.1, 0.0, 0.25, 0.75, 1.0]))
    np.testing.assert_allclose(a.numpy(), [0.0, 0.0, 0.5, 0.9, 1.0], atol=1e-6)  # cos=0 -> A=0 by definition
    txt = PMTResponse.load("20inch", 11).summary()
    assert "11 PMTs" in txt and "0.211" in txt and "400 nm" in txt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    s = PMTResponse(_cfg(), 50).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    h = _hits(10_000, 50, torch.Generator().manual_seed(2)).to("cuda")
    pe = s.detect(h, g, thin=1.0)
    hits, d = s.digitize(PhotoElectrons.cat([pe, s.dark_noise(10, (0.0, 100.0), g)]), 10, g)
    assert hits.charge.device.type == "cuda" and d["charge"].device.type == "cuda" and len(hits) > 0
