"""Tests of physics.medium against independent expectations (closed forms, Geant4 tables, numerics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from scipy import integrate

from physics.config import ConfigError, config_dir
from physics.medium import Medium, Scintillator, sample_hg_cos, sample_rayleigh_cos

CONFIGS = config_dir() / "media"

# Sellmeier coefficients of the Geant4 reference script (Daimon & Masumura 2007 form), re-typed here
SELL_B = (5.684027565e-1, 1.726177391e-1, 2.086189578e-2, 1.130748688e-1)
SELL_C = (5.101829712e-3, 1.821153936e-2, 2.620722293e-2, 1.069792721e1)


def sellmeier_np(wl_nm: np.ndarray) -> np.ndarray:
    l2 = (np.asarray(wl_nm, dtype=np.float64) * 1e-3) ** 2
    return np.sqrt(1.0 + sum(b * l2 / (l2 - c) for b, c in zip(SELL_B, SELL_C, strict=True)))


@pytest.fixture(scope="module")
def water() -> Medium:
    return Medium.load("water")


def test_refractive_index_matches_geant4_table(water):
    # rindex values stored in shared/reference/geant4/mu500_water_n_lambda.h5 tables/rindex
    g4 = {300.0: 1.35920604, 400.0: 1.34355668, 500.0: 1.33679598, 600.0: 1.33302339}
    wl = torch.tensor(list(g4), dtype=torch.float64)
    n = water.refractive_index(wl)
    np.testing.assert_allclose(n.numpy(), list(g4.values()), atol=2e-8)


def test_group_index_vs_high_precision_finite_difference(water):
    wl = np.linspace(300.0, 600.0, 31)
    h = 1e-3  # nm; 4th-order central difference, error ~ h^4 n''''' ~ 1e-14
    dn = (
        -sellmeier_np(wl + 2 * h)
        + 8 * sellmeier_np(wl + h)
        - 8 * sellmeier_np(wl - h)
        + sellmeier_np(wl - 2 * h)
    ) / (12 * h)
    ng_ref = sellmeier_np(wl) - wl * dn
    ng = water.group_index(torch.tensor(wl, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ng, ng_ref, rtol=1e-9)
    assert (ng > sellmeier_np(wl)).all()  # normal dispersion: photons slower than c/n


def test_group_index_of_table_model_vs_cauchy():
    """A table sampled from a Cauchy law n = A + B/l^2 must give n_g close to A + 3B/l^2 (analytic)."""
    a, b = 1.4642, 5323.0
    wl_tab = np.linspace(280.0, 680.0, 41)
    cfg = yaml.safe_load(open(CONFIGS / "juno_ls.yaml"))
    cfg.pop("scintillation")
    cfg["refractive_index"] = {
        "model": "table",
        "wavelength_nm": wl_tab.tolist(),
        "n": (a + b / wl_tab**2).tolist(),
    }
    m = Medium(cfg)
    wl = torch.linspace(320.0, 620.0, 61, dtype=torch.float64)
    # C1 Hermite spline on a 10 nm table: derivative error ~1e-4 (timing error < 2e-4 relative)
    np.testing.assert_allclose(m.group_index(wl).numpy(), a + 3 * b / wl.numpy() ** 2, atol=3e-4)


def test_absorption_rayleigh_mie_lengths_and_scales(water):
    wl = torch.tensor([420.0, 430.0, 500.0, 400.0], dtype=torch.float64)
    lab = water.absorption_length(wl)
    np.testing.assert_allclose(
        lab[:3].detach().numpy(), [1 / 0.00454, 1 / (0.5 * (0.00454 + 0.00635)), 1 / 0.0204], rtol=1e-12
    )
    ray = water.rayleigh_length(wl).detach().numpy()
    np.testing.assert_allclose(ray, 1.0 / (0.00288 * (wl.numpy() / 500.0) ** -4.32), rtol=1e-12)
    assert torch.isinf(water.mie_length(wl)).all()
    # scales multiply the lengths and carry gradients
    m = Medium.load("water")
    with torch.no_grad():
        m.abs_scale.fill_(2.0)
    np.testing.assert_allclose(m.absorption_length(wl).detach().numpy(), 2 * lab.detach().numpy())
    m.rayleigh_length(wl).sum().backward()
    assert m.rayleigh_scale.grad is not None and float(m.rayleigh_scale.grad) > 0
    assert m.abs_scale.dtype == torch.float64
    # dtype follows the input
    assert water.absorption_length(wl.float()).dtype == torch.float32
    att = water.attenuation_length(wl)
    assert torch.isfinite(att).all() and (att < lab).all()


def test_mie_enabled_from_config():
    cfg = yaml.safe_load(open(CONFIGS / "water.yaml"))
    cfg["mie"] = {"enabled": True, "length_m": 50.0, "reference_nm": 400.0, "exponent": 1.0, "g": 0.8}
    m = Medium(cfg)
    wl = torch.tensor([400.0, 800.0], dtype=torch.float64)
    np.testing.assert_allclose(m.mie_length(wl).detach().numpy(), [50.0, 100.0])
    assert m.mie_g == 0.8


def test_rayleigh_sampler_moments():
    n = 400_000
    mu = sample_rayleigh_cos(n, torch.Generator().manual_seed(11), dtype=torch.float64)
    assert mu.abs().max() <= 1.0
    # E[mu^2] = 2/5, Var[mu^2] = 9/35 - 4/25 ; E[mu] = 0, Var = 2/5
    se2 = math.sqrt((9 / 35 - 4 / 25) / n)
    assert abs(float((mu**2).mean()) - 0.4) < 4 * se2
    assert abs(float(mu.mean())) < 4 * math.sqrt(0.4 / n)
    # binned shape vs 3/8 (1 + mu^2)
    edges = np.linspace(-1, 1, 21)
    h, _ = np.histogram(mu.numpy(), edges)
    cdf = 0.375 * (edges + edges**3 / 3) + 0.5
    exp = np.diff(cdf) * n
    chi2 = float(((h - exp) ** 2 / exp).sum())
    assert chi2 < 50  # 19 dof; p ~ 1e-4


@pytest.mark.parametrize("g", [0.9, 0.5, 0.0, -0.3])
def test_hg_sampler_mean_is_g(g):
    n = 300_000
    mu = sample_hg_cos(n, g, torch.Generator().manual_seed(3), dtype=torch.float64)
    # second moment of HG: E[mu^2] = (1 + 2 g^2) / 3
    var = (1 + 2 * g * g) / 3 - g * g
    assert abs(float(mu.mean()) - g) < 4 * math.sqrt(var / n)


def test_scintillator_time_and_spectrum():
    s = Medium.load("juno_ls")
    assert isinstance(s, Scintillator)
    gen = torch.Generator().manual_seed(5)
    n = 400_000
    t = s.sample_emission_time(n, gen, dtype=torch.float64)
    w = s.decay_weights.numpy()
    tau = s.decay_times.numpy()
    mean_exp = float((w * (tau + s.rise_time)).sum())
    var_exp = float((w * (tau**2 + s.rise_time**2 + (tau + s.rise_time) ** 2)).sum()) - mean_exp**2
    assert abs(float(t.mean()) - mean_exp) < 4 * math.sqrt(var_exp / n)
    # pdf integrates to 1 (independent quadrature)
    area, _ = integrate.quad(
        lambda x: float(s.emission_time_pdf(torch.tensor([x], dtype=torch.float64))[0]),
        0,
        5000,
        limit=400,
        points=[5, 20, 100, 400],
    )
    assert abs(area - 1.0) < 1e-4
    wl = s.sample_wavelength(n, gen, dtype=torch.float64)
    xs = np.asarray(s.config["scintillation"]["emission_spectrum"]["wavelength_nm"], float)
    ys = np.asarray(s.config["scintillation"]["emission_spectrum"]["intensity"], float)
    grid = np.linspace(xs[0], xs[-1], 20001)
    dens = np.interp(grid, xs, ys)
    mean_exp = np.trapezoid(grid * dens, grid) / np.trapezoid(dens, grid)
    assert abs(float(wl.mean()) - mean_exp) < 0.1
    assert float(wl.min()) >= xs[0] and float(wl.max()) <= xs[-1]


def _water_cfg() -> dict:
    return yaml.safe_load(open(CONFIGS / "water.yaml"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.pop("absorption"),
        lambda c: c.update(extra_key=1),
        lambda c: c["refractive_index"].update(model="magic"),
        lambda c: c["absorption"].update(coefficient_per_m=[-1.0] * 14),
        lambda c: c["absorption"].update(wavelength_nm=list(range(600, 300, -22))[:14]),
        lambda c: c["rayleigh"].update(b_per_m=0.0),
        lambda c: c["mie"].update(g=1.0),
        lambda c: c["material"].update(density_g_cm3="dense"),
        lambda c: c.update(wavelength_range_nm=[600, 300]),
        lambda c: c["refractive_index"].update(C_um2=[0.16, 0.01, 0.02, 10.0]),  # resonance at 400 nm
    ],
)
def test_bad_config_raises(mutate):
    cfg = _water_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError):
        Medium(cfg)


def test_bad_yaml_and_unknown_preset(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError):
        Medium.load(p)
    with pytest.raises(ConfigError):
        Medium.load("no_such_medium")
    with pytest.raises(ConfigError):
        sample_hg_cos(10, 1.5, torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_follows_input():
    m = Medium.load("water").to("cuda")
    wl = torch.linspace(300, 600, 5, device="cuda")
    for f in (m.refractive_index, m.group_index, m.absorption_length, m.rayleigh_length, m.mie_length):
        assert f(wl).device.type == "cuda"
    g = torch.Generator(device="cuda").manual_seed(0)
    assert sample_rayleigh_cos(10, g).device.type == "cuda"
