"""Reference estimators the CBAE is compared with (charge [p.e.] and arrival time [ns] of one pulse).

* ``oracle_fit``: least-squares fit of the TRUE template (known shape, gain, baseline) with
  scipy.optimize.least_squares, started at the true parameters, one waveform at a time. With
  ``whiten=True`` the residuals are whitened with the Cholesky factor of the true noise covariance
  (white + AR(1) + quantisation 1/12 LSB^2), i.e. the Gaussian maximum-likelihood fit.
* ``posterior_mean``: the Bayes posterior mean of (charge, time) with the TRUE template and noise covariance
  under uniform priors on the test box: the minimum-mean-squared-error estimator, so no estimator, with or
  without the truth in its start, has a smaller RMS error on data drawn from those priors.
* ``conventional``: window integral for the charge, Q = sum_k (adc_k - baseline) dt / gain, and
  constant-fraction timing: linear interpolation of the leading-edge crossing of f x peak, minus the
  template's own constant-fraction delay (computed from the template on a fine grid; no truth used).
  (Constant-fraction discrimination: D. A. Gedcke and W. J. McDonald, Nucl. Instrum. Meth. 58 (1968) 253.)
Waveforms: (N, S) ADC counts on the electronics' sample grid (t_start = 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import solve_triangular
from scipy.optimize import least_squares
from torch import Tensor

from physics.config import ConfigError
from physics.electronics import Electronics, ar1_cholesky


def noise_cholesky(el: Electronics, noise_scale: float) -> np.ndarray:
    """Lower Cholesky factor (S,S) of the per-sample noise covariance [ADC^2] incl. quantisation."""
    S = el.n_samples
    phi = math.exp(-el.sampling_period / el.corr_time)
    Lc = ar1_cholesky(S, phi, float(el.corr_sigma) * noise_scale, dtype=torch.float64).numpy()
    cov = Lc @ Lc.T + np.eye(S) * ((float(el.white_sigma) * noise_scale) ** 2 + 1.0 / 12.0)
    return np.linalg.cholesky(cov)


def oracle_fit(
    el: Electronics,
    adc: Tensor,
    q_true: Tensor,
    t_true: Tensor,
    whiten: bool = False,
    noise_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-waveform scipy least-squares fit of (charge, time) with the true template; returns (q, t) (N,)."""
    offs = el.sample_offsets(torch.float64, "cpu").numpy()
    gain, base = float(el.gain), float(el.baseline)
    y_all = adc.double().cpu().numpy()
    L = noise_cholesky(el, noise_scale) if whiten else None

    def model(p: np.ndarray) -> np.ndarray:
        s = torch.from_numpy(offs - p[1])
        return base + gain * p[0] * el.pulse(s).numpy()

    qs, ts = np.empty(len(y_all)), np.empty(len(y_all))
    for i, y in enumerate(y_all):
        if L is None:
            fun = lambda p, y=y: model(p) - y  # noqa: E731
        else:
            fun = lambda p, y=y: solve_triangular(L, model(p) - y, lower=True, check_finite=False)  # noqa: E731
        r = least_squares(
            fun, x0=np.array([float(q_true[i]), float(t_true[i])]), method="lm", x_scale=[1.0, 1.0]
        )
        qs[i], ts[i] = r.x
    return qs, ts


def cf_delay(el: Electronics, fraction: float = 0.3) -> float:
    """Time [ns] after the onset where the template's leading edge crosses ``fraction`` of its peak."""
    s = torch.linspace(0.0, 200.0, 200001, dtype=torch.float64)
    f = el.pulse(s)
    k = int(torch.argmax(f))
    idx = int(torch.nonzero(f[: k + 1] < fraction * f[k])[-1])
    a, b = float(f[idx]), float(f[idx + 1])
    return float(s[idx]) + (fraction * float(f[k]) - a) / (b - a) * float(s[1] - s[0])


def conventional(el: Electronics, adc: Tensor, fraction: float = 0.3) -> tuple[Tensor, Tensor]:
    """Integral charge [p.e.] and constant-fraction time [ns] for waveforms (N,S); vectorised."""
    x = adc.double() - float(el.baseline)
    q = x.sum(1) * el.sampling_period / float(el.gain)
    offs = el.sample_offsets(torch.float64, adc.device)
    kmax = torch.argmax(x, 1)
    peak = x.gather(1, kmax[:, None])[:, 0]
    thr = fraction * peak
    idx = torch.arange(x.shape[1], device=adc.device)[None, :]
    below = (x < thr[:, None]) & (idx <= kmax[:, None])
    last = torch.where(below, idx, torch.full_like(idx, -1)).amax(1).clamp_min(0)
    nxt = torch.minimum(last + 1, kmax)
    a, b = x.gather(1, last[:, None])[:, 0], x.gather(1, nxt[:, None])[:, 0]
    frac = torch.where(b > a, (thr - a) / (b - a), torch.zeros_like(a)).clamp(0, 1)
    t_cross = offs[last] + frac * el.sampling_period * (nxt - last)
    return q, t_cross - cf_delay(el, fraction)


def _template_grid(
    el: Electronics, time_range: tuple[float, float], grid_step: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(sample offsets (S,) [ns], grid times (G,) [ns] over ``time_range`` in ``grid_step`` steps, true
    templates (G, S) [ADC per p.e.]), float64 on CPU: the pulse hypotheses of the grid-based references."""
    offs = el.sample_offsets(torch.float64, "cpu")
    tg = torch.arange(time_range[0], time_range[1] + 1e-9, grid_step, dtype=torch.float64)
    return offs, tg, float(el.gain) * el.pulse(offs[None, :] - tg[:, None])


def oracle_fit_global(
    el: Electronics,
    adc: Tensor,
    charge_range: tuple[float, float] = (0.5, 30.0),
    time_range: tuple[float, float] = (-5.0, 40.0),
    grid_step: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of the TRUE template WITHOUT the truth: the global minimum of
    chi^2(q, t) = sum_k (y_k - b - g q f(t_k - t))^2 over the prior box (charge_range [p.e.] x time_range
    [ns]). Profile scan over t on a ``grid_step`` [ns] grid with the closed-form (linear) charge
    q(t) = <y - b, f_t> / <f_t, f_t> clamped to the box, then a bounded least-squares refinement
    (scipy trust-region reflective) from the best grid point. This is the maximum-likelihood estimator a
    real analysis with a perfectly known pulse shape can run; ``oracle_fit`` (started at the truth)
    can never be misled by a noise fluctuation and is a lower bound no estimator reaches at low
    signal-to-noise. Returns (q, t) (N,) numpy."""
    gain, base = float(el.gain), float(el.baseline)
    offs, tg, F = _template_grid(el, time_range, grid_step)
    y = adc.double().cpu() - base  # (N, S)
    ff = (F * F).sum(1).clamp_min(1e-30)  # (G,)
    qg = ((y @ F.T) / ff).clamp(*charge_range)  # (N, G)
    chi2 = (y * y).sum(1, keepdim=True) - 2 * qg * (y @ F.T) + qg * qg * ff
    best = chi2.argmin(1)
    q0, t0 = qg.gather(1, best[:, None])[:, 0].numpy(), tg[best].numpy()
    offs_np, y_np = offs.numpy(), y.numpy()

    def model(p: np.ndarray) -> np.ndarray:
        return gain * p[0] * el.pulse(torch.from_numpy(offs_np - p[1])).numpy()

    lo, hi = np.array([charge_range[0], time_range[0]]), np.array([charge_range[1], time_range[1]])
    qs, ts = np.empty(len(y_np)), np.empty(len(y_np))
    for i, yi in enumerate(y_np):
        x0 = np.clip([q0[i], t0[i]], lo + 1e-9, hi - 1e-9)
        r = least_squares(lambda p, yi=yi: model(p) - yi, x0=x0, bounds=(lo, hi), method="trf")
        qs[i], ts[i] = r.x
    return qs, ts


def _log_prob_between(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails (the upper tail is mirrored to the lower)."""
    flip = lo > 0
    u, v = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    a, b = torch.special.log_ndtr(u), torch.special.log_ndtr(v)
    return a + torch.log1p(-torch.exp(b - a).clamp(max=1.0 - 1e-16))


def posterior_mean(
    el: Electronics,
    adc: Tensor,
    noise_scale: float,
    charge_range: tuple[float, float] = (0.5, 30.0),
    time_range: tuple[float, float] = (-5.0, 40.0),
    grid_step: float = 0.02,
) -> tuple[Tensor, Tensor]:
    """Bayes posterior means (N, 2) [q p.e., t ns] and posterior variances (N, 2) [p.e.^2, ns^2], float64, of
    single-pulse waveforms (N, S) [ADC].

    Model: y = baseline + q g f(t_k - t) + n, n ~ N(0, C) with C the true noise covariance at ``noise_scale``
    (white + AR(1) + quantisation 1/12 LSB^2, :func:`noise_cholesky`); priors uniform on ``charge_range`` x
    ``time_range``. With the whitened template w_t = L^-1 g f(. - t) and data z = L^-1 (y - b), a(t) = |w_t|^2
    and b(t) = w_t . z, the likelihood is Gaussian in q, so q is integrated in closed form: p(t | y) ~ a^-1/2
    exp(b^2 / 2a) [Phi((q_hi - b/a) a^1/2) - Phi((q_lo - b/a) a^1/2)], and E[q | t, y] is the mean of N(b/a,
    1/a) truncated to the charge range. t is summed on a ``grid_step`` [ns] grid (uniform prior). The
    posterior mean minimises the expected squared error (S. M. Kay, "Fundamentals of Statistical Signal
    Processing: Estimation Theory", 1993, ch. 10): on data drawn from these priors no estimator has a smaller
    RMS error. It is the bound to quote beside the truth-started ``oracle_fit``, which a dim pulse lost to a
    noise peak never fools. The mean posterior variance over such data is that smallest mean squared error,
    E[(theta - E[theta | y])^2] = E[Var(theta | y)]: a far less noisy estimate of the bound than the sample
    RMS, which a few lost pulses dominate. Vectorised: one (N, G) matrix for G grid times.
    """
    if not grid_step > 0:
        raise ConfigError(f"posterior_mean: grid_step={grid_step!r}; allowed: > 0 ns")
    _, tg, F = _template_grid(el, time_range, grid_step)
    L = torch.from_numpy(noise_cholesky(el, noise_scale))
    W = torch.linalg.solve_triangular(L, F.T, upper=False).T  # (G, S) whitened templates
    z = torch.linalg.solve_triangular(L, (adc.double().cpu() - float(el.baseline)).T, upper=False).T
    a = (W * W).sum(1).clamp_min(1e-30)  # (G,)
    b = z @ W.T  # (N, G)
    mu, sd = b / a, a.rsqrt()
    lo, hi = (charge_range[0] - mu) / sd, (charge_range[1] - mu) / sd
    log_z = _log_prob_between(lo, hi)
    w = torch.softmax(0.5 * b * mu - 0.5 * torch.log(a) + log_z, 1)  # p(t | y) on the grid
    log_phi = lambda x: -0.5 * x * x - 0.5 * math.log(2.0 * math.pi)  # noqa: E731
    f_lo, f_hi = torch.exp(log_phi(lo) - log_z), torch.exp(log_phi(hi) - log_z)
    q_t = mu + sd * (f_lo - f_hi)  # E[q | t, y]: truncated-normal mean
    # truncated-normal variance (at an infinite bound the phi x bound product is 0)
    lo_f = torch.where(torch.isfinite(lo), lo * f_lo, 0.0)
    hi_f = torch.where(torch.isfinite(hi), hi * f_hi, 0.0)
    v_t = sd * sd * (1.0 + lo_f - hi_f - (f_lo - f_hi) ** 2)
    q_m, t_m = (w * q_t).sum(1), (w * tg).sum(1)
    q_v = (w * (v_t + (q_t - q_m[:, None]) ** 2)).sum(1)
    t_v = (w * (tg - t_m[:, None]) ** 2).sum(1)
    return torch.stack([q_m, t_m], 1), torch.stack([q_v, t_v], 1)
