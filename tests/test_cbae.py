"""CBAE: decoder gradients, checkpoint round trip and errors, and the SHIPPED model vs the oracle fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from physics.config import ConfigError
from physics.electronics import Electronics
from physics.waveforms import NOISE_LEVELS, simulate_waveforms
from surrogate import CBAE, load_cbae, save_cbae
from surrogate.baselines import (
    conventional,
    noise_cholesky,
    oracle_fit,
    oracle_fit_global,
    posterior_mean,
)
from surrogate.cbae import ENCODERS

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "cbae_default.pt"


def _model(seed: int = 0, **kw) -> CBAE:
    torch.manual_seed(seed)
    st = -20.0 + 2.0 * torch.arange(64)
    return CBAE(
        64,
        st,
        enc_hidden=[32, 32],
        dec_hidden=[16, 16],
        n_free=1,
        wf_offset=200.0,
        wf_scale=40.0,
        param_mean=[15.0, 17.0],
        param_std=[8.0, 13.0],
        **kw,
    )


@pytest.mark.parametrize("decoder", ["shift", "shift_linear", "mlp"])
def test_decoder_gradients_flow_and_gradcheck(decoder):
    m = _model(decoder=decoder).double()
    p = torch.tensor([[3.0, 5.0], [12.0, 20.5]], dtype=torch.float64, requires_grad=True)
    w = m.expect(p)
    assert w.shape == (2, 64)
    w.pow(2).sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad.abs() > 0).all()
    p2 = p.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: m.expect(x), (p2,), fast_mode=True)


def test_checkpoint_roundtrip_identical(tmp_path):
    m = _model(3).eval()
    x = 200 + 20 * torch.randn(50, 64)
    path = save_cbae(m, tmp_path / "m.pt", {"note": "test"})
    m2 = load_cbae(path)
    with torch.no_grad():
        for a, b in zip(m.estimate(x), m2.estimate(x), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(m.denoise(x), m2.denoise(x))
        p = torch.tensor([[5.0, 10.0]])
        assert torch.equal(m.expect(p), m2.expect(p))
    assert m2.metadata == {"note": "test"}
    assert not list(tmp_path.glob(".*tmp*"))


def test_checkpoint_wrong_version_or_shape_raises(tmp_path):
    m = _model()
    path = save_cbae(m, tmp_path / "m.pt")
    blob = torch.load(path, weights_only=True)
    blob["format_version"] = 99
    torch.save(blob, tmp_path / "v99.pt")
    with pytest.raises(ConfigError, match="format_version"):
        load_cbae(tmp_path / "v99.pt")
    blob["format_version"] = 1
    blob["hparams"]["n_samples"] = 128  # declared shape no longer fits the weights
    torch.save(blob, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match="architecture"):
        load_cbae(tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match="n_samples"):
        load_cbae(path, n_samples=32)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="format"):
        load_cbae(tmp_path / "other.pt")
    with pytest.raises(ConfigError):
        load_cbae(tmp_path / "missing.pt")
    with pytest.raises(ConfigError):
        m.estimate(torch.zeros(3, 63))


def test_expect_channels_superposition():
    m = _model(1).double().eval()
    ch = torch.tensor([0, 0, 1])
    t = torch.tensor([5.0, 20.0, 8.0], dtype=torch.float64)
    q = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    w = m.expect_channels(ch, t, q, 2, torch.tensor([0.0, 3.0], dtype=torch.float64))
    single = m.expect(torch.tensor([[2.0, 5.0], [3.0, 20.0], [1.0, 5.0]], dtype=torch.float64)) - 200.0
    torch.testing.assert_close(w[0], 200.0 + single[0] + single[1])
    torch.testing.assert_close(w[1], 200.0 + single[2])


# ----------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.is_file():
        pytest.fail(f"shipped checkpoint {SHIPPED} missing")
    model = load_cbae(SHIPPED, n_samples=64)
    el = Electronics(model.electronics)
    d = simulate_waveforms(
        el, 4000, torch.Generator().manual_seed(424242), (0.5, 30.0), (-5.0, 40.0), "medium"
    )
    with torch.inference_mode():
        p, s = model.estimate(d["adc"].float())
        den = model.denoise(d["adc"].float())
        exp = model.expect(torch.stack([d["charge"], d["time"]], 1))
    return model, el, d, p.double(), s.double(), den.double(), exp.double()


def test_shipped_metadata_and_size(shipped):
    model = shipped[0]
    meta = model.metadata
    assert SHIPPED.stat().st_size < 2_000_000
    assert meta["config"]["electronics"] == "default" and meta["package_version"]
    assert SHIPPED.with_suffix(".json").is_file()
    assert model.electronics["shape"] == "lognormal"


def test_shipped_encoder_vs_oracle_medium_noise(shipped):
    """Charge and time resolution of the encoder vs the oracle (scipy least squares of the TRUE template,
    started at the truth) on the same fresh medium-noise waveforms (charge U(0.5, 30) p.e.).

    Measured (these 600 waveforms, shipped model: aligned_raw/shift_linear, beta-NLL 0.5, profile-weighted
    decoder terms, 45 epochs): charge RMS 0.0963 vs oracle 0.1030 p.e. (0.94: the unweighted LS oracle
    ignores the correlated noise); time 68% half-width 0.0206 vs 0.0198 ns (1.04); time RMS above 5 p.e.
    0.0235 vs 0.0223 (1.05); over all charges 0.058 vs 0.048 (1.20, a tail below 5 p.e.). Previous model
    (15 epochs, plain MSE): 1.01 / 1.30 / 1.30 / 1.97. Conventional integral/CFD: 0.49 p.e. / 0.106 ns (w68).
    Bias over 4000: charge -0.009 p.e., time +0.003 ns.
    """
    model, el, d, p, s, _, _ = shipped
    k = 600
    q, t = d["charge"][:k].double(), d["time"][:k].double()
    oq, ot = oracle_fit(el, d["adc"][:k], q, t)
    rms = lambda e: float(np.sqrt(np.mean(np.asarray(e) ** 2)))  # noqa: E731
    w68 = lambda e: float(np.diff(np.percentile(np.asarray(e), [16, 84]))[0] / 2)  # noqa: E731
    eq, et = (p[:k, 0] - q).numpy(), (p[:k, 1] - t).numpy()
    oeq, oet = oq - q.numpy(), ot - t.numpy()
    assert rms(eq) < 1.05 * rms(oeq), (rms(eq), rms(oeq))
    assert w68(et) < 1.15 * w68(oet), (w68(et), w68(oet))
    hi = (q >= 5).numpy()
    assert rms(et[hi]) < 1.15 * rms(oet[hi]), (rms(et[hi]), rms(oet[hi]))
    assert rms(et) < 1.4 * rms(oet), (rms(et), rms(oet))
    # far better than the conventional integral / constant-fraction estimators
    qc, tc = conventional(el, d["adc"][:k])
    assert rms(eq) < 0.5 * rms(qc - q) and w68(et) < 0.5 * w68((tc - t).numpy())
    # biases small compared with the resolution (4000 waveforms)
    assert abs(float((p[:, 0] - d["charge"]).mean())) < 0.1 * rms(oeq) + 0.01
    assert abs(float((p[:, 1] - d["time"]).mean())) < 0.01


def test_shipped_uncertainty_heads(shipped):
    """Predicted sigma vs actual error: pull = (est - true)/sigma. Measured pull SD at medium noise 0.95
    (charge) and 0.89 (time, > 3 p.e.). The sigma head is refitted after training about the exported
    (moving-average) weights' estimates (optim.var_refit_epochs); without the refit it had learned the
    raw weights' larger scatter and came out ~25 % too large (SD 0.79 / 0.79). At the ends of the noise
    range the heads are still off (pull RMS ~0.7 at low noise, ~1.25 at high: bench_cbae.py)."""
    _, _, d, p, s, _, _ = shipped
    pull_q = (p[:, 0] - d["charge"]) / s[:, 0]
    pull_t = (p[:, 1] - d["time"]) / s[:, 1]
    hi = d["charge"] > 3
    assert torch.isfinite(s).all() and (s > 0).all()
    assert 0.85 < float(pull_q.std()) < 1.15
    assert 0.85 < float(pull_t[hi].std()) < 1.15
    # sigma tracks the error: larger predicted sigma -> larger actual error (time, low vs high charge)
    lo = d["charge"] < 3
    assert float((p[:, 1] - d["time"])[lo].abs().mean()) > 2 * float((p[:, 1] - d["time"])[hi].abs().mean())
    assert float(s[lo, 1].mean()) > 2 * float(s[hi, 1].mean())


def test_shipped_denoising_and_decoder_fidelity(shipped):
    _, el, d, _, _, den, exp = shipped
    clean = d["clean"].double()
    before = float((d["adc"].double() - clean).pow(2).mean().sqrt())
    after = float((den - clean).pow(2).mean().sqrt())
    sigma = el.oracle_sigma(NOISE_LEVELS["medium"])
    assert before == pytest.approx(sigma, rel=0.05)  # raw noise = config sigma incl. quantisation
    assert after < 0.25 * before  # measured 0.37 / 1.83 ADC
    fid = float((exp - clean).pow(2).mean().sqrt())
    assert fid < 0.06 * sigma  # measured 0.060 ADC = 0.033 sigma


# ------------------------------------------------------------------------ refinement (analysis by synthesis)
def test_refine_recovers_decoder_truth_and_cramer_rao(shipped):
    """Independent expectation: on waveforms generated BY the decoder (x = expect(q, t) + white Gaussian
    noise of known sigma) the LM fit is the exact-model least-squares estimator, so (i) without noise it
    returns the truth from a displaced start, (ii) with noise its pulls (est - true)/sigma_CR have unit SD
    (Gauss-Markov / Cramer-Rao; measured 0.98-1.03 on 1500 waveforms)."""
    model, *_ = shipped
    g = torch.Generator().manual_seed(77)
    n = 1500
    truth = torch.stack([2 + 25 * torch.rand(n, generator=g), 40 * torch.rand(n, generator=g)], 1)
    with torch.no_grad():
        clean = model.expect(truth)
    start = truth + torch.tensor([0.5, 0.3])
    zero = torch.zeros(n, model.n_free)  # expect() uses free = 0
    p, _ = model.refine(clean, start, n_iter=8, free=zero)
    assert (p - truth).abs().amax(0)[0] < 2e-3 and (p - truth).abs().amax(0)[1] < 2e-3, (
        (p - truth).abs().amax(0)
    )
    sig = 1.5
    noisy = clean + sig * torch.randn(clean.shape, generator=g)
    p, s = model.refine(noisy, truth, n_iter=8, noise_sigma=sig, free=zero)
    pull = ((p - truth) / s).double()
    assert torch.isfinite(s).all() and (s > 0).all()
    sd = pull.std(0)
    assert 0.9 < float(sd[0]) < 1.1 and 0.9 < float(sd[1]) < 1.1, sd


def test_refine_vs_encoder_and_oracle_medium_noise(shipped):
    """Fit of the learned decoder started at the encoder estimate, on the same fresh medium-noise waveforms
    as the encoder/oracle test: the issue-4 floor (within 10% of the oracle) at medium noise. Measured
    (these 600 waveforms): time RMS 0.0477 ns vs encoder 0.0576 (0.83x) and oracle 0.0480 (0.99x); above
    5 p.e. 0.0224 vs encoder 0.0235 and oracle 0.0223 (1.00x); charge RMS 0.1024 vs oracle 0.1030 (0.99x).
    Pull SD 1.28 (charge: the noise is AR(1)-correlated, not the white sigma given), 1.01 (time)."""
    model, el, d, p, _, _, _ = shipped
    k = 600
    q, t = d["charge"][:k].double(), d["time"][:k].double()
    oq, ot = oracle_fit(el, d["adc"][:k], q, t)
    pr, sr = model.refine(d["adc"][:k].float(), noise_sigma=el.oracle_sigma(NOISE_LEVELS["medium"]))
    pr, sr = pr.double(), sr.double()
    rms = lambda e: float(np.sqrt(np.mean(np.asarray(e) ** 2)))  # noqa: E731
    hi = (q >= 5).numpy()
    et, eq, enc_t = (pr[:, 1] - t).numpy(), (pr[:, 0] - q).numpy(), (p[:k, 1] - t).numpy()
    oet, oeq = ot - t.numpy(), oq - q.numpy()
    assert rms(et) < 0.92 * rms(enc_t), (rms(et), rms(enc_t))
    assert rms(et[hi]) < rms(enc_t[hi]), (rms(et[hi]), rms(enc_t[hi]))
    assert rms(et) < 1.1 * rms(oet), (rms(et), rms(oet))
    assert rms(et[hi]) < 1.1 * rms(oet[hi]), (rms(et[hi]), rms(oet[hi]))
    assert rms(eq) < 1.1 * rms(oeq), (rms(eq), rms(oeq))
    # uncertainty from (J^T J)^-1 sigma^2 with the white sigma: time pulls ~1 (measured SD 1.01), charge
    # pulls wider (1.28): the charge integrates the slow AR(1) noise, which a white sigma leaves out
    pull = (pr - torch.stack([q, t], 1)) / sr
    assert 0.9 < float(pull[:, 1].std()) < 1.15 and 1.1 < float(pull[:, 0].std()) < 1.5, pull.std(0)
    # Gauss-Markov: with the electronics' own noise covariance (AR(1) + white + quantisation) the charge
    # pulls come to unit width (measured SD 0.97 charge, 1.04 time)
    chol = torch.from_numpy(noise_cholesky(el, NOISE_LEVELS["medium"]))
    pc, sc = model.refine(d["adc"][:k].float(), noise_cov=(chol @ chol.T).float())
    pull = (pc.double() - torch.stack([q, t], 1)) / sc.double()
    assert 0.85 < float(pull[:, 0].std()) < 1.15 and 0.85 < float(pull[:, 1].std()) < 1.15, pull.std(0)


def test_refine_dtype_device_and_errors(shipped):
    model, _, d, _, _, _, _ = shipped
    x = d["adc"][:64]
    with torch.no_grad():
        p0, _ = model.estimate(x.float())
    p32, s32 = model.refine(x.float(), n_iter=0)
    assert p32.dtype == torch.float32 and torch.allclose(p32, p0, atol=1e-5)  # clamp only, inside the box
    p32, s32 = model.refine(x.float(), n_iter=5)
    md = load_cbae(SHIPPED).double()
    p64, s64 = md.refine(x.double(), n_iter=5)
    assert p64.dtype == torch.float64 and s64.dtype == torch.float64
    torch.testing.assert_close(p64.float(), p32, atol=2e-3, rtol=1e-3)
    pi, _ = model.refine(x.round().to(torch.int32), n_iter=2)  # integer ADC counts -> model dtype
    assert pi.dtype == torch.float32 and torch.isfinite(pi).all()
    with torch.inference_mode():
        pinf, _ = model.refine(x.float(), n_iter=5)
    torch.testing.assert_close(pinf, p32)
    b = model.param_bounds()
    assert (p64[:, 0] >= b[0, 0]).all() and (p64[:, 1] <= b[1, 1]).all()
    if torch.cuda.is_available():
        pc, _ = load_cbae(SHIPPED).cuda().refine(x.float().cuda(), n_iter=5)
        assert pc.device.type == "cuda"
        torch.testing.assert_close(pc.cpu(), p32, atol=2e-3, rtol=1e-3)
    with pytest.raises(ConfigError, match="n_iter"):
        model.refine(x, n_iter=-1)
    with pytest.raises(ConfigError, match="params"):
        model.refine(x, torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="noise_sigma"):
        model.refine(x, noise_sigma=-1.0)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_kinds_shapes_and_errors(encoder):
    m = _model(encoder=encoder).eval()
    x = 200 + 20 * torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p, s = m.estimate(x)
    assert p.shape == (7, 2) and s.shape == (7, 2) and torch.isfinite(p).all() and (s > 0).all()
    with pytest.raises(ConfigError, match="encoder"):
        _model(encoder="cnn")
    with pytest.raises(ConfigError, match="decoder"):
        _model(decoder="template")


def test_shift_linear_decoder_scales_per_charge():
    """shift_linear output = (q/std_q) g(s, q, free): zero response at zero charge, for any weights."""
    m = _model(decoder="shift_linear").double()
    w = m.expect(torch.tensor([[0.0, 5.0], [0.0, 30.0]], dtype=torch.float64))
    torch.testing.assert_close(w, torch.full_like(w, 200.0))


def test_oracle_fit_global_noise_free_and_vs_truth_start():
    """Independent check of the no-truth oracle: on noise-free true-template waveforms it returns the truth
    (global scan + LS), and on noisy large pulses it agrees with the truth-started fit (same minimum)."""
    el = Electronics.load("default")
    g = torch.Generator().manual_seed(5)
    d = simulate_waveforms(el, 40, g, (2.0, 30.0), (-5.0, 40.0), "none")
    q, t = oracle_fit_global(el, d["clean"].double())  # clean includes the baseline
    np.testing.assert_allclose(q, d["charge"].numpy(), atol=2e-4)
    np.testing.assert_allclose(t, d["time"].numpy(), atol=2e-4)
    d = simulate_waveforms(el, 40, g, (10.0, 30.0), (-5.0, 40.0), "medium")
    q, t = oracle_fit_global(el, d["adc"])
    oq, ot = oracle_fit(el, d["adc"], d["charge"].double(), d["time"].double())
    np.testing.assert_allclose(t, ot, atol=2e-4)
    np.testing.assert_allclose(q, oq, atol=2e-3)


def test_posterior_mean_closed_form_charge_integral_vs_quadrature():
    """The posterior integrates the charge in closed form (truncated Gaussian); a second method, sums of the
    whitened likelihood over a fine (q, t) grid, gives the same means and variances of (q, t) (to 1e-3
    p.e. / ns and 1 %); a non-positive grid step raises."""
    el = Electronics.load("default")
    d = simulate_waveforms(el, 6, torch.Generator().manual_seed(8), (0.5, 30.0), (-5.0, 40.0), "high")
    mean, var = posterior_mean(el, d["adc"], NOISE_LEVELS["high"], grid_step=0.1)
    offs = el.sample_offsets(torch.float64, "cpu")
    tg = torch.arange(-5.0, 40.0 + 1e-9, 0.1, dtype=torch.float64)
    qg = torch.linspace(0.5, 30.0, 20001, dtype=torch.float64)
    L = torch.from_numpy(noise_cholesky(el, NOISE_LEVELS["high"]))
    F = float(el.gain) * el.pulse(offs[None, :] - tg[:, None])
    W = torch.linalg.solve_triangular(L, F.T, upper=False).T
    y = (d["adc"].double() - float(el.baseline)).T
    Z = torch.linalg.solve_triangular(L, y, upper=False).T
    for i in range(6):
        b, a = W @ Z[i], (W * W).sum(1)  # chi^2(q, t) = |z|^2 - 2 q b(t) + q^2 a(t)
        w = torch.softmax((qg[None, :] * b[:, None] - 0.5 * qg[None, :] ** 2 * a[:, None]).flatten(), 0)
        w = w.view(len(tg), len(qg))
        pq, pt = w.sum(0), w.sum(1)
        m = torch.stack([(pq * qg).sum(), (pt * tg).sum()])
        v = torch.stack([(pq * (qg - m[0]) ** 2).sum(), (pt * (tg - m[1]) ** 2).sum()])
        torch.testing.assert_close(mean[i], m, atol=1e-3, rtol=0)
        torch.testing.assert_close(var[i], v, rtol=0.01, atol=1e-6)
    with pytest.raises(ConfigError, match="grid_step"):
        posterior_mean(el, d["adc"], 1.0, grid_step=0.0)


def test_posterior_mean_is_the_minimum_mean_square_error_estimator():
    """On waveforms drawn from the priors it assumes (high noise, charge U(0.5, 30), time U(-5, 40)), the
    posterior mean has the properties of the MMSE estimator (Kay 1993, ch. 10): unbiased, its error
    orthogonal to the estimate (|corr(error, estimate)| within 3 standard errors of 0), and its squared
    error per waveform equal on average to the posterior variance (mean of error^2 / variance = 1 within 4
    standard errors: E[(theta - E[theta|y])^2 | y] = Var(theta | y)). The least-squares fit started at the
    truth, which no estimator can be, has a time RMS far below the bound, sqrt(mean posterior variance)
    (measured on 20000 such waveforms: bound 0.99 ns, truth-started fit 0.23 ns)."""
    el = Electronics.load("default")
    n = 1500
    d = simulate_waveforms(el, n, torch.Generator().manual_seed(31), (0.5, 30.0), (-5.0, 40.0), "high")
    truth = torch.stack([d["charge"], d["time"]], 1).double()
    mean, var = posterior_mean(el, d["adc"], NOISE_LEVELS["high"])
    for j in range(2):
        e = mean[:, j] - truth[:, j]
        assert abs(float(e.mean())) < 3 * float(e.std()) / n**0.5
        corr = float(torch.corrcoef(torch.stack([e, mean[:, j]]))[0, 1])
        assert abs(corr) < 3 / n**0.5, corr
        z = e * e / var[:, j]
        assert abs(float(z.mean()) - 1.0) < 4 * float(z.std()) / n**0.5, float(z.mean())
    _, ot = oracle_fit(el, d["adc"][:300], truth[:300, 0], truth[:300, 1])
    assert float(np.sqrt(np.mean((ot - truth[:300, 1].numpy()) ** 2))) < 0.5 * float(var[:, 1].mean().sqrt())


def test_refine_scan_escapes_wrong_start(shipped):
    """Analysis by synthesis with the decoder's global start search: on noise-free decoder waveforms started
    15-25 ns away from the truth, the local LM alone cannot reach the truth (the pulse is outside its
    basin) while scan + LM returns the truth (global minimum chi^2 = 0)."""
    model, *_ = shipped
    g = torch.Generator().manual_seed(11)
    n = 200
    truth = torch.stack([2 + 25 * torch.rand(n, generator=g), 40 * torch.rand(n, generator=g)], 1)
    with torch.no_grad():
        clean = model.expect(truth)
    off = (15 + 10 * torch.rand(n, generator=g)) * torch.where(truth[:, 1] > 17.5, -1.0, 1.0)
    start = truth + torch.stack([torch.zeros(n), off], 1)
    zero = torch.zeros(n, model.n_free)
    p_loc, _ = model.refine(clean, start, n_iter=8, free=zero)
    p_scan, _ = model.refine(clean, start, n_iter=8, free=zero, scan_step=1.0)
    assert float(((p_loc[:, 1] - truth[:, 1]).abs() > 1.0).float().mean()) > 0.5
    assert float((p_scan - truth).abs().amax()) < 5e-3, (p_scan - truth).abs().amax(0)
    with pytest.raises(ConfigError, match="scan_step"):
        model.refine(clean[:2], scan_step=0.0)


@pytest.mark.slow
def test_shipped_refine_scan_vs_global_fit_high_noise(shipped):
    """High noise (3x): a 0.5-1 p.e. pulse can be outscored by a noise fluctuation elsewhere in the window
    (chi^2 at the truth > chi^2 at the noise peak), so no estimator without the truth can time it. The
    reference a real estimator can reach is the no-truth true-template fit (oracle_fit_global, second
    method); the truth-started oracle_fit is reported in the benchmark. Encoder + decoder scan + LM: time
    RMS within 10% of the global fit, charge RMS within 10% of the truth-started oracle."""
    model, el, *_ = shipped
    d = simulate_waveforms(el, 500, torch.Generator().manual_seed(2024), (0.5, 30.0), (-5.0, 40.0), "high")
    q, t = d["charge"].double(), d["time"].double()
    ps, _ = model.refine(d["adc"].float(), scan_step=1.0)
    _, gt = oracle_fit_global(el, d["adc"])
    oq, _ = oracle_fit(el, d["adc"], q, t)
    rms = lambda e: float(np.sqrt(np.mean(np.asarray(e) ** 2)))  # noqa: E731
    e_t = (ps[:, 1].double() - t).numpy()
    assert rms(e_t) < 1.1 * rms(gt - t.numpy()), (rms(e_t), rms(gt - t.numpy()))
    assert rms((ps[:, 0].double() - q).numpy()) < 1.1 * rms(oq - q.numpy())


@pytest.mark.slow
def test_shipped_refine_low_noise_floor(shipped):
    """Low noise (0.3x): the decoder's shape error (0.11 sigma here) is the limit of the fit. Recommended
    analysis-by-synthesis set-up (free units at 0 = the teacher-trained response, prior-box bounds, start
    scan). Benchmark (1000 waveforms): time RMS 1.03x, charge RMS 1.06x the truth-started oracle, charge
    bias +0.008 p.e. (0.24 oracle RMS: not within the 10% bias floor). Here: time < 1.1x, charge < 1.15x."""
    model, el, *_ = shipped
    d = simulate_waveforms(el, 600, torch.Generator().manual_seed(777), (0.5, 30.0), (-5.0, 40.0), "low")
    q, t = d["charge"].double(), d["time"].double()
    box = torch.tensor([[0.5, 30.0], [-5.0, 40.0]])
    ps, _ = model.refine(d["adc"].float(), scan_step=1.0, bounds=box, free=torch.zeros(600, model.n_free))
    oq, ot = oracle_fit(el, d["adc"], q, t)
    rms = lambda e: float(np.sqrt(np.mean(np.asarray(e) ** 2)))  # noqa: E731
    assert rms((ps[:, 1].double() - t).numpy()) < 1.1 * rms(ot - t.numpy())
    assert rms((ps[:, 0].double() - q).numpy()) < 1.15 * rms(oq - q.numpy())
