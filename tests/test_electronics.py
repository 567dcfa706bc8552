"""Electronics stage: templates, clean waveform, noise statistics, ADC; labelled waveform files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad

from physics.config import ConfigError
from physics.electronics import Electronics, biexp_peak, list_presets, template
from physics.waveforms import WaveformDataset, make_waveform_file, read_waveforms, simulate_waveforms


def _cfg(**kw):
    base = Electronics.load("default").config
    return {**base, **kw}


@pytest.mark.parametrize("name", ["default", "biexp", "ringing"])
def test_template_unit_area(name):
    el = Electronics.load(name)
    f = lambda s: float(el.pulse(torch.tensor([s], dtype=torch.float64)))  # noqa: E731
    area = quad(f, 0, 400, limit=500, points=[5, 10, 20, 40])[0]
    assert area == pytest.approx(1.0, abs=1e-6)
    assert name in list_presets()


def test_lognormal_matches_scipy_and_biexp_peak():
    s = torch.linspace(-5, 80, 500, dtype=torch.float64)
    f = template("lognormal", s, {"tau": 8.0, "sigma": 0.35}).numpy()
    ref = np.where(s.numpy() > 0, stats.lognorm(s=0.35, scale=8.0).pdf(np.clip(s.numpy(), 1e-9, None)), 0.0)
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-14)
    tp, peak = biexp_peak(2.0, 10.0)
    grid = torch.linspace(0, 30, 300001, dtype=torch.float64)
    fb = template("biexp", grid, {"rise": 2.0, "fall": 10.0})
    assert float(grid[fb.argmax()]) == pytest.approx(tp, abs=1e-3)
    assert float(fb.max()) == pytest.approx(peak, rel=1e-8)


def test_expect_is_sum_of_scaled_templates():
    el = Electronics.load("default")
    ch = torch.tensor([0, 0, 2])
    t = torch.tensor([3.0, 17.5, 40.0], dtype=torch.float64)
    q = torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    t_start = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    w = el.expect(ch, t, q, 3, t_start)
    tk = -20.0 + 2.0 * np.arange(64)
    pdf = lambda x: np.where(x > 0, stats.lognorm(s=0.35, scale=8.0).pdf(np.clip(x, 1e-9, None)), 0.0)  # noqa: E731
    ref0 = 200 + 100 * (1.0 * pdf(tk - 3.0) + 2.5 * pdf(tk - 17.5))
    ref2 = 200 + 100 * 4.0 * pdf(tk + 10.0 - 40.0)
    np.testing.assert_allclose(w[0].numpy(), ref0, rtol=1e-10)
    np.testing.assert_allclose(w[1].numpy(), 200.0)
    np.testing.assert_allclose(w[2].numpy(), ref2, rtol=1e-10)
    # pulse area in the samples: sum * dt = gain * charge (fine sampling of a unit-area template)
    assert float((w[0] - 200).sum() * 2.0) == pytest.approx(100 * 3.5, rel=2e-3)


@pytest.mark.parametrize("name", ["default", "ringing"])
def test_expect_gradcheck_t_and_charge(name):
    el = Electronics.load(name)
    ch = torch.tensor([0, 1, 1])
    t = torch.tensor([4.3, 10.1, 22.7], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([1.3, 0.7, 2.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, q: el.expect(ch, t, q, 2), (t, q))
    w = el.expect(ch, t, q, 2)
    w.sum().backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(q.grad).all() and (q.grad > 0).all()


def test_white_noise_sigma_and_ar1_autocorrelation():
    el = Electronics(_cfg(white_sigma=2.0, corr_sigma=3.0, corr_time=8.0))
    g = torch.Generator().manual_seed(1)
    n = el.noise(40000, g, dtype=torch.float64)
    var_tot = 2.0**2 + 3.0**2
    assert float(n.var()) == pytest.approx(var_tot, rel=0.02)
    phi = math.exp(-2.0 / 8.0)
    for lag in (1, 2, 5):
        c = float((n[:, :-lag] * n[:, lag:]).mean())
        assert c == pytest.approx(9.0 * phi**lag, abs=0.1)
    # stationarity: the AR(1) part has the same variance at the first and last sample
    assert float(n[:, 0].var()) == pytest.approx(float(n[:, -1].var()), rel=0.05)
    # noise_scale multiplies both sigmas
    n2 = el.noise(40000, torch.Generator().manual_seed(2), noise_scale=0.5, dtype=torch.float64)
    assert float(n2.var()) == pytest.approx(0.25 * var_tot, rel=0.02)


def test_sample_quantisation_noise_and_dtype():
    el = Electronics(_cfg(white_sigma=1.5, corr_sigma=0.0))
    C = 20000
    z = torch.zeros(0, dtype=torch.float64)
    adc = el.sample(torch.zeros(0, dtype=torch.long), z, z, C, generator=torch.Generator().manual_seed(3))
    assert adc.dtype == torch.int16 and adc.shape == (C, 64)
    a = adc.double()
    assert float(a.mean()) == pytest.approx(200.0, abs=0.01)
    # rounding adds uniform quantisation noise of variance 1/12 LSB^2 (sigma >> 1 LSB)
    assert float(a.var()) == pytest.approx(1.5**2 + 1 / 12, rel=0.02)


def test_saturation_and_quantisation_modes():
    ch, t, q = torch.tensor([0, 1]), torch.tensor([10.0, 10.0]), torch.tensor([1000.0, 2.0])
    for mode, fn in (("round", np.round), ("floor", np.floor)):
        el = Electronics(_cfg(white_sigma=0.0, corr_sigma=0.0, quantisation=mode))
        adc = el.sample(ch, t, q, 2, generator=torch.Generator().manual_seed(0))
        clean = el.expect(ch, t.double(), q.double(), 2).numpy()
        assert int(adc[0].max()) == 4095  # 1000 p.e. saturates 12 bits
        np.testing.assert_array_equal(adc[0].numpy(), np.clip(fn(clean[0]), 0, 4095))
        np.testing.assert_array_equal(adc[1].numpy(), fn(clean[1]))
    el16 = Electronics(_cfg(adc_bits=16, baseline=1000.0, white_sigma=0.0))
    assert el16.sample(ch, t, q, 2).dtype == torch.int32


@pytest.mark.parametrize(
    "bad",
    [
        {"shape": "gaussian"},
        {"gain": -1.0},
        {"n_samples": 1},
        {"quantisation": "ceil"},
        {"bogus": 1},
        {"shape": "biexp", "shape_params": {"rise": 10.0, "fall": 2.0}},
        {"shape_params": {"tau": 8.0}},
        {"baseline": 5000.0},
        {"white_sigma": "big"},
    ],
)
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError):
        Electronics(_cfg(**bad))


def test_bad_expect_args():
    el = Electronics.load("default")
    with pytest.raises(ConfigError):
        el.expect(torch.tensor([3]), torch.tensor([1.0]), torch.tensor([1.0]), 2)
    with pytest.raises(ConfigError):
        Electronics.load("no_such_preset")


def test_waveform_file_roundtrip_and_lazy_dataset(tmp_path):
    el = Electronics.load("default")
    path = make_waveform_file(tmp_path / "wf.h5", el, n=300, seed=5, noise="medium", pileup_mean=0.5)
    assert not list(tmp_path.glob(".*tmp*"))
    data, attrs = read_waveforms(path)
    assert attrs["electronics"]["shape"] == "lognormal" and attrs["units"]["time"] == "ns"
    assert attrs["seed"] == 5 and attrs["generator"]["pileup_mean"] == 0.5
    assert data["adc"].shape == (300, 64) and data["adc"].dtype == torch.int16
    # same seed -> same data; clean equals the electronics expectation of the stored pulses
    again = simulate_waveforms(el, 300, torch.Generator().manual_seed(5), noise="medium", pileup_mean=0.5)
    assert torch.equal(again["adc"], data["adc"])
    i = int(torch.nonzero(data["n_pulses"] > 1)[0])
    m = int(data["n_pulses"][i])
    ref = el.expect(
        torch.zeros(m, dtype=torch.long),
        data["pulse_time"][i, :m].double(),
        data["pulse_charge"][i, :m].double(),
        1,
    )
    np.testing.assert_allclose(data["clean"][i].numpy(), ref[0].numpy(), rtol=1e-5)
    ds = WaveformDataset(path)
    items = [17, 3, 250, 3]
    b = ds.__getitems__(items)
    np.testing.assert_array_equal(b["adc"].numpy(), data["adc"][items].float().numpy())
    np.testing.assert_allclose(b["params"][:, 1].numpy(), data["time"][items].numpy())
    assert torch.equal(ds[250]["adc"], b["adc"][2])
    with pytest.raises(ConfigError):
        simulate_waveforms(el, 10, torch.Generator(), noise="loud")


def test_log_uniform_priors_of_charge_and_noise():
    """charge_prior / noise_prior 'log': log q and log(noise scale) uniform on their ranges (KS), and the
    mean charge equals the log-uniform closed form (hi - lo) / ln(hi / lo); 'mixed' follows the mean of the
    uniform and log-uniform CDFs (KS); bad names and lo = 0 raise."""
    el = Electronics.load("default")
    n, (qlo, qhi), (slo, shi) = 4000, (0.5, 30.0), (0.3, 3.0)

    def log_u(x, lo, hi):  # uniform on [0, 1] when x is log-uniform on [lo, hi]
        return (np.log(x.double().numpy()) - math.log(lo)) / math.log(hi / lo)

    g = torch.Generator().manual_seed(11)
    d = simulate_waveforms(el, n, g, (qlo, qhi), noise=[slo, shi], charge_prior="log", noise_prior="log")
    assert stats.kstest(log_u(d["charge"], qlo, qhi), "uniform").pvalue > 1e-3
    assert stats.kstest(log_u(d["noise_scale"], slo, shi), "uniform").pvalue > 1e-3
    mean = (qhi - qlo) / math.log(qhi / qlo)
    sd = math.sqrt((qhi**2 - qlo**2) / (2 * math.log(qhi / qlo)) - mean**2)
    assert abs(float(d["charge"].double().mean()) - mean) < 4 * sd / math.sqrt(n)
    # 'mixed': half uniform, half log-uniform, so the CDF is the mean of the two CDFs
    g = torch.Generator().manual_seed(12)
    m = simulate_waveforms(el, n, g, (qlo, qhi), charge_prior="mixed")["charge"]

    def cdf(x):
        return 0.5 * (x - qlo) / (qhi - qlo) + 0.5 * np.log(x / qlo) / math.log(qhi / qlo)

    assert stats.kstest(m.double().numpy(), cdf).pvalue > 1e-3
    assert stats.kstest(log_u(m, qlo, qhi), "uniform").pvalue < 1e-6
    # the default is still uniform: such a draw fails the log-uniform KS test
    u = simulate_waveforms(el, n, torch.Generator().manual_seed(11), (qlo, qhi), noise="medium")["charge"]
    assert stats.kstest(log_u(u, qlo, qhi), "uniform").pvalue < 1e-6
    with pytest.raises(ConfigError, match="charge_prior"):
        simulate_waveforms(el, 10, torch.Generator(), charge_prior="logarithmic")
    with pytest.raises(ConfigError, match="noise_prior.*lo > 0"):
        simulate_waveforms(el, 10, torch.Generator(), noise=[0.0, 2.0], noise_prior="log")
