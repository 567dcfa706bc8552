"""Per-PMT negative log-likelihood terms for hit data (the standard water-Cherenkov recipe, design §5).

Units: charge p.e., time ns, rates Hz. Shapes: E events x P PMTs; every term returns per-PMT NLL (E,P) and
:class:`HitLikelihood` sums them to a per-event NLL (E,).

Model (fiTQun-like, Jiang et al. (Super-K), PRD 99 (2019) 092005, sec. III; here with exact Poisson sums):

* The number of p.e. in PMT i is Poisson with mean m_i = mu_direct + mu_indirect + mu_dark, where
  mu_dark = R_dark * T_window (dark p.e. uniform in the readout window).
* Charge: the charge of n p.e. is the sum of n single-p.e. charges of mean g (gain) and relative variance v,
  approximated (central limit, exact in mean and variance) by N(q; n g, n v g^2). The joint density of
  "hit with charge q" is p(q) = sum_{n>=1} Poisson(n | m) N(q; n g, n v g^2); it integrates over q to
  1 - P(0) = 1 - exp(-m). A PMT is hit when q >= threshold, so P(unhit) = exp(-m) + sum_n Poisson(n|m)
  Phi((thr - n g) / (g sqrt(n v))). The sum over n is truncated to a window around the peak of the
  summand (chosen from detached values, evaluated with log-sum-exp; the terms left out are < e^-30 of it).
* Over-dispersion (optional ``obs['mu_rel_var']`` = w, (E,P)): when the expectation is itself an average
  over event-to-event fluctuations that the model does not resolve (a muon's multiple-scattering kinks move
  its sharp Cherenkov ring from event to event; the model's mean ring is smeared), the count of a PMT is a
  Poisson mixture whose mean varies: the direct light mu_direct with relative variance w (variance
  V = w mu_direct^2; dark noise and indirect light do not move with the ring). It is modelled as a Gamma
  mixture: negative binomial with mean m and variance m + V (e.g. Johnson, Kemp & Kotz, Univariate Discrete
  Distributions, 3rd ed., 2005, sec. 5.3), which replaces Poisson(n | m) in the charge and no-hit terms;
  w = 0 is the Poisson case. w is an input held fixed within a fit (a shape of the fluctuation, which
  scales with the light); V follows mu_direct. The time term takes the same Gamma mixture for the direct
  light (``time_log_density``, rel_var): a PMT that the ring has moved onto sees more p.e. and so an
  earlier first one.
* Time: the p.e. of a PMT form a Poisson process in time with rate
  lambda(t) = mu_direct N(t; t_mean, t_var + TTS^2) + mu_indirect f_ind(t) + mu_dark f_flat(t),
  (direct peak convolved with the Gaussian transit-time spread; indirect light flat over the window, or an
  exponential tail exp(-(t - t_mean)/tau)/tau convolved with the same Gaussian). The flat density f_flat is
  the window's box convolved with the TTS Gaussian, as the p.e. are digitised (``physics.sensors``: dark p.e.
  uniform in the window, then the TTS jitter), so a dark hit just outside the window has a finite density
  (with a sharp box one such hit cost an SK event thousands of NLL units). The hit time is the first
  p.e. (leading-edge discriminator), whose density given at least one p.e. is
  lambda(t) exp(-Lambda(t)) / (1 - exp(-Lambda_tot)), Lambda(t) = int_{-inf}^t lambda (first event of an
  inhomogeneous Poisson process; e.g. Daley & Vere-Jones, An Introduction to the Theory of Point Processes,
  2003, sec. 7.2). With ``first_hit=False`` the single-p.e. density lambda(t)/Lambda_tot is used instead.
  The threshold acts on the time as well: a first p.e. at t makes a hit only if the charge of it and the
  p.e. after it (Poisson, mean Lambda_tot - Lambda(t)) reaches the threshold, with the sub-threshold
  probabilities f_n of the same Gaussian n-p.e. charge model (``sub_threshold_probs``); a PMT with few p.e.
  is then hit only when more arrive, so its hit comes earlier (in SK 4.7 % of single p.e. fall below 0.25
  p.e.; the first hit of a 0.5-2 p.e. PMT moves by about 20 ps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from physics.config import ConfigError

__all__ = [
    "charge_log_density",
    "unhit_log_prob",
    "sub_threshold_probs",
    "time_log_density",
    "hits_to_dense",
    "ChargeTerm",
    "TimeTerm",
    "HitLikelihood",
]

LOG_2PI = math.log(2.0 * math.pi)


def _check_finite(name: str, x: Tensor, mask: Tensor | None = None) -> None:
    """Raise ConfigError if x (restricted to mask) holds NaN/inf."""
    v = x if mask is None else x[mask]
    if v.numel() and not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v)).sum())
        raise ConfigError(f"{name}: {bad} non-finite value(s) (NaN/inf); allowed: finite numbers")


def _log_poisson(n: Tensor, mu: Tensor) -> Tensor:
    """log Poisson(n | mu) = n log mu - mu - lgamma(n + 1) for mu > 0 (n float tensor)."""
    return n * torch.log(mu) - mu - torch.lgamma(n + 1.0)


# relative variance below which the negative binomial is evaluated as its Poisson limit (the neglected
# correction is ~ r ((n - mu)^2 - n) / 2 < 1e-6 for counts below 1000; keeps 1/r^3 in double backward finite)
_NB_MIN_R = 1e-12


def _stirling_tail(x: Tensor) -> Tensor:
    """omega(x) = lgamma(x) - (x - 1/2) log x + x - log(2 pi)/2 for x >= 10, by its asymptotic series
    1/(12x) - 1/(360x^3) + 1/(1260x^5) - 1/(1680x^7) (Abramowitz & Stegun 6.1.41; error < 1e-13 at x = 10)."""
    y = 1.0 / (x * x)
    return (1.0 / 12.0 - y * (1.0 / 360.0 - y * (1.0 / 1260.0 - y / 1680.0))) / x


def _log_nb_excess(n: Tensor, mu: Tensor, r: Tensor) -> Tensor:
    """log NB(n | mean mu, shape k = 1/r) - log Poisson(n | mu), float64, stable for every r > 0.

    log NB - log Poisson = D(n, k) - (k + n) log1p(r mu) + mu with D = lgamma(n + k) - lgamma(k) - n log k.
    For k >= 10, D = (n + k - 1/2) log1p(n/k) - n + omega(n + k) - omega(k) (Stirling with the series tail
    ``_stirling_tail``), which keeps its accuracy as k -> inf (D -> n (n - 1) / (2k)); below, the lgamma
    difference is exact enough. r <= _NB_MIN_R gives 0 (the Poisson limit), with zero derivatives."""
    nb = r > _NB_MIN_R
    r = torch.where(nb, r, torch.ones_like(r))  # no inf/NaN in the unused branch's derivatives
    k = 1.0 / r
    big = k >= 10.0
    kb = torch.where(big, k, torch.full_like(k, 10.0))
    ks = torch.where(big, torch.full_like(k, 1.0), k)
    d_big = (n + kb - 0.5) * torch.log1p(n / kb) - n + _stirling_tail(n + kb) - _stirling_tail(kb)
    d_small = torch.lgamma(n + ks) - torch.lgamma(ks) - n * torch.log(ks)
    d = torch.where(big, d_big, d_small)
    return torch.where(nb, d - (k + n) * torch.log1p(r * mu) + mu, torch.zeros_like(d))


def _log_count(n: Tensor, mu: Tensor, mu_var: Tensor | None) -> Tensor:
    """log P(n p.e.): Poisson(n | mu), or with ``mu_var`` the negative binomial of mean mu and variance
    mu + mu_var (Gamma-mixed mean, module doc), evaluated in float64 and returned in mu's dtype."""
    lp = _log_poisson(n, mu)
    if mu_var is None:
        return lp
    r = mu_var.double() / (mu.double() * mu.double())
    return lp + _log_nb_excess(n.double(), mu.double(), r).to(mu.dtype)


def _below_z(n: Tensor, threshold: float, gain: Tensor, rel_var: float) -> Tensor:
    """(thr - n g) / (g sqrt(n v)): Phi of it is the probability that n p.e. stay below the threshold in the
    Gaussian n-p.e. charge model N(n g, n v g^2) (module doc)."""
    return (threshold - n * gain) / (gain * torch.sqrt(n * rel_var))


def _n_window(q: Tensor, mu: Tensor, rel_var: float, gain: Tensor) -> tuple[Tensor, Tensor]:
    """Start lo (…) and width k (…, long) of each element's summation window over the p.e. count n
    (detached, n >= 1).

    The summand is P(n|mu) N(q; n g, n v g^2): it lives between n ~ q/g and n ~ mu; the window spans
    both with 8 standard deviations (sqrt(n (1 + v))) and 3 extra terms on each side. The same window serves
    the negative binomial: beyond it the charge factor N(q; n g, n v g^2) alone is below e^-32 (for the
    no-hit sum, the threshold factor), whatever the width of P(n)."""
    with torch.no_grad():
        qn = (q / gain).clamp_min(0.0)
        lo_c = torch.minimum(qn, mu)
        hi_c = torch.maximum(qn, mu)
        width = 8.0 * torch.sqrt((hi_c + 1.0) * (1.0 + rel_var))
        lo = torch.floor(lo_c - width - 3.0).clamp_min(1.0)
        hi = torch.ceil(hi_c + width + 3.0)
        k = (hi - lo).long().clamp_min(0) + 1
    return lo, k


def _window_logsumexp(log_term, lo: Tensor, k: Tensor) -> Tensor:
    """log sum_n exp(log_term(n, i)) over n = lo_i, lo_i + 1, ... for every element i of lo, k (any shape;
    ``_n_window``); returns lo's shape.

    log_term(n (M,W), i (M,) indices into the flattened elements) -> (M,W) log terms. The elements are
    evaluated in at most two groups, each padded to its widest window: split at the width that minimises
    the padded count (a few broad windows, near bright PMTs, would otherwise pad every element; measured
    1.5-2x fewer terms in WCTE and SK). Padding only adds terms beyond an element's window (< e^-32)."""
    lo_f, k_f = lo.reshape(-1), k.reshape(-1)
    m = k_f.numel()
    if m == 0:
        return lo.new_zeros(lo.shape)
    ks = torch.sort(k_f).values
    j = torch.arange(m, device=k_f.device)
    cost = (j + 1) * ks + (m - 1 - j) * ks[-1]
    cut, k_max = ks[int(cost.argmin())], int(ks[-1])
    groups = [(k_f <= cut, int(cut)), (k_f > cut, k_max)]
    out = None
    for sel, w in groups:
        i = sel.nonzero()[:, 0]
        if i.numel() == 0:
            continue
        n = lo_f[i, None] + torch.arange(w, dtype=lo_f.dtype, device=lo_f.device)
        part = torch.logsumexp(log_term(n, i), -1)
        out = part.new_zeros(m) if out is None else out
        out = out.index_put((i,), part)
    return out.reshape(lo.shape)


def charge_log_density(
    q: Tensor, mu: Tensor, rel_var: float, gain: Tensor | float = 1.0, mu_var: Tensor | None = None
) -> Tensor:
    """log p(q, hit) = log sum_{n>=1} P(n | mu) N(q; n g, n v g^2)  (any shape, broadcast).

    q [p.e.] observed charge, mu > 0 mean p.e., rel_var = v (relative variance of the single-p.e. charge),
    gain g; P = Poisson, or with ``mu_var`` [p.e.^2] (>= 0) the negative binomial of mean mu and variance
    mu + mu_var (module doc). Integrates over q to 1 - P(0). Differentiable in mu, q, g and mu_var."""
    if mu_var is not None:
        q, mu, mu_var = torch.broadcast_tensors(q, mu, mu_var)
    else:
        q, mu = torch.broadcast_tensors(q, mu)
    g = torch.as_tensor(gain, dtype=q.dtype, device=q.device).expand_as(q)
    lo, k = _n_window(q, mu, rel_var, g)
    qf, muf, gf = q.reshape(-1), mu.reshape(-1), g.reshape(-1)
    mvf = None if mu_var is None else mu_var.reshape(-1)

    def log_term(n: Tensor, i: Tensor) -> Tensor:
        gi = gf[i, None]
        var = n * rel_var * (gi * gi)
        logn = -((qf[i, None] - n * gi) ** 2) / (2.0 * var) - 0.5 * (LOG_2PI + torch.log(var))
        return _log_count(n, muf[i, None], None if mvf is None else mvf[i, None]) + logn

    return _window_logsumexp(log_term, lo, k)


def unhit_log_prob(
    mu: Tensor,
    rel_var: float,
    threshold: float = 0.0,
    gain: Tensor | float = 1.0,
    mu_var: Tensor | None = None,
) -> Tensor:
    """log P(no hit) = log[P(0|mu) + sum_{n>=1} P(n|mu) Phi((thr - n g)/(g sqrt(n v)))].

    P as in :func:`charge_log_density` (Poisson: P(0) = exp(-mu); with ``mu_var``: (1 + r mu)^(-1/r),
    r = mu_var / mu^2). Equal to log P(0|mu) at threshold 0."""
    if mu_var is None:
        log_p0 = -mu
    else:
        mu, mu_var = torch.broadcast_tensors(mu, mu_var)
        # log P(0) = -mu + the negative binomial's excess at n = 0 (= -log1p(r mu) / r)
        m64 = mu.double()
        r = mu_var.double() / (m64 * m64)
        log_p0 = (_log_nb_excess(torch.zeros_like(m64), m64, r) - m64).to(mu.dtype)
    if threshold <= 0.0:
        return log_p0
    g = torch.as_tensor(gain, dtype=mu.dtype, device=mu.device).expand_as(mu)
    lo, k = _n_window(torch.zeros_like(mu), mu, rel_var, g)
    muf, gf = mu.reshape(-1), g.reshape(-1)
    mvf = None if mu_var is None else mu_var.reshape(-1)

    def log_term(n: Tensor, i: Tensor) -> Tensor:
        z = _below_z(n, threshold, gf[i, None], rel_var)
        return _log_count(n, muf[i, None], None if mvf is None else mvf[i, None]) + torch.special.log_ndtr(z)

    terms = _window_logsumexp(log_term, lo, k)
    return torch.logsumexp(torch.stack([log_p0, terms], -1), -1)


def sub_threshold_probs(
    threshold: float, rel_var: float, gain: Tensor | float = 1.0, tol: float = 1e-9, n_max: int = 64
) -> Tensor:
    """f_n = P(charge of n p.e. < threshold) = Phi((thr - n g) / (g sqrt(n v))), n = 1..K, shape gain's + (K,)
    (float64): the Gaussian n-p.e. charge model of :func:`unhit_log_prob`, for the time term's threshold
    (:func:`time_log_density`, below). K is the smallest count after which f_n < tol for every gain (K = 0
    at threshold <= 0). threshold [p.e.], rel_var v of the single-p.e. charge, gain g (scalar or (P,)).
    Raises ConfigError when more than n_max p.e. can stay below the threshold."""
    g = torch.as_tensor(gain, dtype=torch.float64)
    if threshold <= 0.0:
        return g.new_zeros(g.shape + (0,))
    if bool((g <= 0).any()):
        raise ConfigError(f"gain: got {float(g.min()):g} (smallest value); allowed: > 0")
    n = torch.arange(1, n_max + 2, dtype=torch.float64, device=g.device)
    f = torch.special.ndtr(_below_z(n, threshold, g[..., None], rel_var))
    f = torch.nan_to_num(f, nan=0.0)  # v = 0 and thr = n g: the charge is not below
    keep = (f >= tol).reshape(-1, n_max + 1).any(0).nonzero()
    n_k = int(keep.max()) + 1 if keep.numel() else 0
    if n_k > n_max:
        raise ConfigError(
            f"threshold: got {threshold:g} p.e. at gain {float(g.min()):g}; allowed: below about "
            f"{n_max // 2} x the gain (more than n_max = {n_max} p.e. can stay below it)"
        )
    return f[..., :n_k].contiguous()


def _flat_log_density(t: Tensor, t_lo: float, t_hi: float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """log density [1/ns] and CDF of U(t_lo, t_hi) convolved with N(0, sigma^2) at t (broadcast).

    With a = (t - t_lo)/sigma, b = (t - t_hi)/sigma, W = t_hi - t_lo: density (Phi(a) - Phi(b)) / W, CDF
    (sigma / W) (G(a) - G(b)) with G(z) = z Phi(z) + phi(z) (the integral of Phi). The log of the difference
    is taken on the side where it does not cancel: log Phi(x1) + log1p(-Phi(x2)/Phi(x1)) with (x1, x2) =
    (a, b) left of the window's centre and (-b, -a) right of it (Phi(a) - Phi(b) = Phi(-b) - Phi(-a)), so it
    stays finite and smooth far outside the window."""
    width = t_hi - t_lo
    sig = torch.as_tensor(sigma, dtype=t.dtype, device=t.device)
    if bool((sig <= 0).any()):
        raise ConfigError(
            f"edge_sigma: got {float(sig.min()):g} ns (smallest value); allowed: > 0 (None: the sharp window)"
        )
    a = (t - t_lo) / sig
    b = (t - t_hi) / sig
    left = (a + b) < 0
    x1 = torch.where(left, a, -b)
    x2 = torch.where(left, b, -a)
    l1 = torch.special.log_ndtr(x1)
    log_dens = l1 + torch.log1p(-torch.exp(torch.special.log_ndtr(x2) - l1)) - math.log(width)

    def g(x: Tensor) -> Tensor:
        return x * torch.special.ndtr(x) + torch.exp(-0.5 * x * x - 0.5 * LOG_2PI)

    cdf = (sig / width * (g(a) - g(b))).clamp(0.0, 1.0)
    return log_dens, cdf


def time_log_density(
    t: Tensor,
    mu_direct: Tensor,
    t_mean: Tensor,
    sigma2: Tensor,
    mu_flat: Tensor,
    window: tuple[float, float],
    *,
    mu_tail: Tensor | None = None,
    tail_tau: float = 20.0,
    first_hit: bool = True,
    rel_var: Tensor | None = None,
    edge_sigma: Tensor | float | None = None,
    below: Tensor | None = None,
) -> Tensor:
    """log density [1/ns] of the hit time t (all tensors broadcast, e.g. (E,P)).

    Rate lambda(t) = mu_direct N(t; t_mean, sigma2) + mu_flat U(window) + mu_tail EMG(t; t_mean, sigma2, tau)
    (exponentially modified Gaussian: exponential delay of mean tau convolved with the Gaussian).
    edge_sigma [ns] (> 0; e.g. the TTS): U(window) convolved with N(0, edge_sigma^2) (``_flat_log_density``);
    None: the sharp box (a time outside the window has no flat density).
    first_hit: density of the earliest p.e. given >= 1, lambda exp(-Lambda(t)) / (1 - exp(-Lambda_tot));
    else lambda / Lambda_tot. sigma2 [ns^2] must include the TTS. Window (t_lo, t_hi) [ns].
    rel_var (first_hit only): the direct light's relative variance w over fluctuations the expectation
    averages over (the negative-binomial counts of the module doc): its rate is G lambda_d with G ~ Gamma
    (mean 1, variance w), so the probability of no p.e. before t is
    exp(-Lambda_o(t)) (1 + w Lambda_d(t))^(-1/w) (the Gamma Laplace transform) and the first-p.e. density
    is that times lambda_o(t) + lambda_d(t) / (1 + w Lambda_d(t)), over
    1 - exp(-Lambda_o,tot) (1 + w mu_direct)^(-1/w); w = 0 is the Poisson form.
    below (first_hit only; (..., K), broadcast with t[..., None]): f_n = P(charge of n p.e. < threshold),
    n = 1..K (``sub_threshold_probs``; f_n = 0 beyond K). A PMT is hit only when its summed charge reaches the
    threshold, so the first p.e. at t makes a hit unless it and the k p.e. after it, Poisson with mean
    R(t) = Lambda_tot - Lambda(t), all stay below: the density is
    lambda(t) [exp(-Lambda(t)) - exp(-Lambda_tot) sum_k R(t)^k / k! f_(k+1)] / P(hit),
    P(hit) = 1 - exp(-Lambda_tot) (1 + sum_n Lambda_tot^n / n! f_n). With rel_var the same is averaged over G
    in closed form, E[G^j exp(-a G)] = (1 + w a)^(-1/w) prod_(i<j) (1 + i w) / (1 + w a)^j (Gamma moments).
    """
    t_lo, t_hi = float(window[0]), float(window[1])
    width = t_hi - t_lo
    sig = torch.sqrt(sigma2)
    z = (t - t_mean) / sig
    log_gauss = -0.5 * z * z - torch.log(sig) - 0.5 * LOG_2PI
    if edge_sigma is None:
        inside = (t >= t_lo) & (t <= t_hi)
        log_flat = torch.where(inside, torch.zeros_like(t), torch.full_like(t, -math.inf)) - math.log(width)
        cdf_flat = ((t - t_lo) / width).clamp(0.0, 1.0)
    else:
        log_flat, cdf_flat = _flat_log_density(t, t_lo, t_hi, edge_sigma)
    comps = [torch.log(mu_direct) + log_gauss, torch.log(mu_flat) + log_flat]
    cum_d = mu_direct * torch.special.ndtr(z)  # direct p.e. expected before t
    cum = cum_d + mu_flat * cdf_flat
    total = mu_direct + mu_flat
    if mu_tail is not None:
        lam = 1.0 / tail_tau
        # EMG density: lam/2 exp(lam/2 (2 m + lam s^2 - 2 t)) erfc((m + lam s^2 - t)/(sqrt2 s))
        arg = (t_mean + lam * sigma2 - t) / (math.sqrt(2.0) * sig)
        pos = arg > 0  # log erfc(x): erfcx form for x > 0 (no underflow), direct for x <= 0 (erfc in [1, 2])
        log_erfc = torch.where(
            pos,
            torch.log(torch.special.erfcx(arg.clamp_min(0.0))) - arg * arg,
            torch.log(torch.erfc(arg.clamp_max(0.0))),
        )
        log_emg = (math.log(0.5 * lam) + 0.5 * lam * (2.0 * t_mean + lam * sigma2 - 2.0 * t)) + log_erfc
        comps.append(torch.log(mu_tail) + log_emg)
        # EMG CDF = Phi(z) - exp(log_emg + log(tau)) ... = Phi(z) - tau * pdf_emg(t)
        cdf_tail = (torch.special.ndtr(z) - tail_tau * torch.exp(log_emg)).clamp(0.0, 1.0)
        cum = cum + mu_tail * cdf_tail
        total = total + mu_tail
    if not first_hit:
        log_rate = torch.logsumexp(torch.stack(torch.broadcast_tensors(*comps), 0), 0)
        return log_rate - torch.log(total)
    thr = below is not None and below.shape[-1] > 0
    if thr:  # the other light's rate and what is left of it after t, before the mixture changes cum
        log_other = torch.logsumexp(torch.stack(torch.broadcast_tensors(*comps[1:]), 0), 0)
        rem_o = mu_flat * (1.0 - cdf_flat)
        if mu_tail is not None:
            rem_o = rem_o + mu_tail * (1.0 - cdf_tail)
        log_direct, total_o = comps[0], total - mu_direct
    w = torch.zeros_like(mu_direct) if rel_var is None else rel_var.to(t.dtype)
    mixed = w > 1e-12
    w_s = torch.where(mixed, w, torch.ones_like(w))

    def eff(lam: Tensor) -> Tensor:  # -log of the mixture's no-p.e. probability for mean lam
        return torch.where(mixed, torch.log1p(w_s * lam) / w_s, lam)

    if rel_var is not None:
        # Gamma-mixed direct light: hazard lambda_d / (1 + w Lambda_d(t)); w Lambda -> log1p(w Lambda) / w
        comps[0] = comps[0] - torch.where(mixed, torch.log1p(w_s * cum_d), torch.zeros_like(cum_d))
        cum = cum - cum_d + eff(cum_d)
        total = total - mu_direct + eff(mu_direct)
    log_rate = torch.logsumexp(torch.stack(torch.broadcast_tensors(*comps), 0), 0)
    log_hit = torch.log(-torch.expm1(-total))
    out = log_rate - cum - log_hit
    if not thr:
        return out
    f = below.to(t.dtype)
    n_k = f.shape[-1]
    rem_d = mu_direct * torch.special.ndtr(-z)

    def powers(x: Tensor, m: int) -> list[Tensor]:  # x^i / i!, i = 0..m-1 (no pow: finite at x = 0)
        acc = [torch.ones_like(x)]
        for i in range(1, m):
            acc.append(acc[-1] * x / i)
        return acc

    if rel_var is None:
        # Poisson (G = 1): the sums below collapse by the binomial theorem, sum_i a^i/i! b^(k-i)/(k-i)! =
        # (a + b)^k / k!, so s0 = s1 = sum_k f_(k+1) R^k / k! with R = R_d + R_o, s_n = sum_n f_n total^n / n!
        # (O(K) instead of O(K^2) products; the general form with w = 0 gives the same to rounding)
        pr = powers(rem_d + rem_o, n_k)
        s0 = s1 = sum(f[..., k] * pr[k] for k in range(n_k))
        qt = powers(total, n_k + 1)
        s_n = sum(f[..., n - 1] * qt[n] for n in range(1, n_k + 1))
    else:
        # Gamma moments m_j = E[G^j exp(-mu_d G)] / E[exp(-mu_d G)], j = 0..K (all 1 for w = 0)
        u = 1.0 + w * mu_direct
        mom = [torch.ones_like(u)]
        for j in range(1, n_k + 1):
            mom.append(mom[-1] * (1.0 + (j - 1) * w) / u)
        # sum_k f_(k+1) E_G[(G R_d + R_o)^k / k! G^j e^(-mu_d G)] / E_G[e^(-mu_d G)] for j = 0 (other
        # light's p.e. first) and j = 1 (a direct p.e. first); binomial expansion of (G R_d + R_o)^k
        pd, po = powers(rem_d, n_k), powers(rem_o, n_k)
        s0 = s1 = 0.0
        for k in range(n_k):
            for i in range(k + 1):
                c = f[..., k] * pd[i] * po[k - i]
                s0 = s0 + c * mom[i]
                s1 = s1 + c * mom[i + 1]
        # normaliser: P(unhit, >= 1 p.e.) = exp(-total) sum_n f_n E_G[(G mu_d + M_o)^n / n!] / E_G[...]^0
        qd, qo = powers(mu_direct, n_k + 1), powers(total_o, n_k + 1)
        s_n = 0.0
        for n in range(1, n_k + 1):
            for i in range(n + 1):
                s_n = s_n + f[..., n - 1] * qd[i] * qo[n - i] * mom[i]
    share = torch.sigmoid(log_direct.clamp_min(-1e4) - log_other.clamp_min(-1e4))  # direct part of the rate
    now_1 = torch.where(mixed, 1.0 / (1.0 + w_s * cum_d), torch.ones_like(cum_d))
    lost = torch.exp(-rem_o - (eff(mu_direct) - eff(cum_d))) * (share * s1 + (1.0 - share) * s0)
    lost = lost / (share * now_1 + (1.0 - share))  # fraction of the first-p.e. density left below threshold
    below_hit = torch.exp(-total - log_hit) * s_n  # P(unhit, >= 1 p.e.) / P(>= 1 p.e.)
    return out + torch.log1p(-lost) - torch.log1p(-below_hit)


def hits_to_dense(
    pmt: Tensor, charge: Tensor, time: Tensor, event: Tensor, n_events: int, n_pmts: int
) -> dict[str, Tensor]:
    """Flat hits (N,) -> dense dict: hit (E,P) bool, charge (E,P) [p.e.] (0 unhit), time (E,P) [ns] (0 unhit).

    Raises ConfigError on NaN/inf charges or times, or PMT/event indices out of range."""
    _check_finite("hits.charge", charge)
    _check_finite("hits.time", time)
    if pmt.numel() and (int(pmt.min()) < 0 or int(pmt.max()) >= n_pmts):
        raise ConfigError(
            f"hits.pmt: values in [{int(pmt.min())}, {int(pmt.max())}], allowed [0, {n_pmts - 1}]"
        )
    if event.numel() and (int(event.min()) < 0 or int(event.max()) >= n_events):
        raise ConfigError(
            f"hits.event: values in [{int(event.min())}, {int(event.max())}], allowed [0, {n_events - 1}]"
        )
    dt = charge.dtype if charge.is_floating_point() else torch.float32
    hit = torch.zeros(n_events, n_pmts, dtype=torch.bool, device=charge.device)
    q = torch.zeros(n_events, n_pmts, dtype=dt, device=charge.device)
    tt = torch.zeros(n_events, n_pmts, dtype=dt, device=charge.device)
    hit[event, pmt] = True
    q[event, pmt] = charge.to(dt)
    tt[event, pmt] = time.to(dt)
    return {"hit": hit, "charge": q, "time": tt}


class ChargeTerm(nn.Module):
    """Charge NLL per PMT: -log P(unhit | m) for unhit PMTs, -log p(q, hit | m) for hit PMTs (E,P).

    spe_rel_var: relative variance of the single-p.e. charge (physics.sensors.spe_moments); threshold [p.e.];
    gain: relative gain (scalar or (P,)); mu_floor [p.e.] keeps log(m) finite when m -> 0."""

    def __init__(
        self, spe_rel_var: float, threshold: float = 0.0, gain: Tensor | float = 1.0, mu_floor: float = 1e-8
    ) -> None:
        super().__init__()
        self.rel_var = float(spe_rel_var)
        self.threshold = float(threshold)
        self.register_buffer("gain", torch.as_tensor(gain, dtype=torch.float64))
        self.mu_floor = float(mu_floor)

    def forward(self, m: Tensor, obs: dict[str, Tensor], mu_var: Tensor | None = None) -> Tensor:
        """Per-PMT NLL (E,P) for total means m (E,P); obs: hit, charge; mu_var (E,P) [p.e.^2]: variance of the
        mean (negative-binomial counts, module doc) or None (Poisson)."""
        hit = obs["hit"]
        m = m + self.mu_floor
        g = self.gain.to(device=m.device, dtype=m.dtype).expand_as(m)
        nll = torch.zeros_like(m)
        q = obs["charge"].to(m.dtype)
        if mu_var is None:
            groups = [(~hit, False, None), (hit, True, None)]
        else:
            # only where r = mu_var / m^2 exceeds the Poisson limit (_NB_MIN_R) do the counts need the
            # negative binomial; elsewhere (most unhit PMTs: no direct light, mu_var = 0) its excess is 0 with
            # zero derivatives, so the Poisson form is the same function at a fraction of the cost
            with torch.no_grad():
                nb = mu_var.detach().double() > _NB_MIN_R * m.detach().double() ** 2
            groups = [(~hit & ~nb, False, None), (~hit & nb, False, mu_var)]
            groups += [(hit & ~nb, True, None), (hit & nb, True, mu_var)]
        for sel, is_hit, var in groups:
            if not bool(sel.any()):
                continue
            i = sel.nonzero(as_tuple=True)
            v = None if var is None else var[i]
            if is_hit:
                lp = charge_log_density(q[i], m[i], self.rel_var, g[i], v)
            else:
                lp = unhit_log_prob(m[i], self.rel_var, self.threshold, g[i], v)
            nll = nll.index_put(i, -lp)
        return nll


class TimeTerm(nn.Module):
    """Hit-time NLL per hit PMT (0 for unhit) (E,P); see :func:`time_log_density`.

    tts: transit-time spread [ns] (scalar or (P,)), an ``nn.Parameter`` (calibration target). threshold
    [p.e.], spe_rel_var and gain (scalar or (P,)): the charge model of :class:`ChargeTerm`, from which the
    first-hit density takes its threshold (``sub_threshold_probs``, fixed at construction; 0: none)."""

    def __init__(
        self,
        window: tuple[float, float],
        tts: float | Tensor = 1.0,
        first_hit: bool = True,
        indirect: str = "flat",
        tail_tau: float = 20.0,
        mu_floor: float = 1e-8,
        threshold: float = 0.0,
        spe_rel_var: float = 0.0,
        gain: Tensor | float = 1.0,
    ) -> None:
        super().__init__()
        if indirect not in ("flat", "tail"):
            raise ConfigError(f"indirect: got {indirect!r}, allowed: ['flat', 'tail']")
        if not float(window[1]) > float(window[0]):
            raise ConfigError(f"window: got {tuple(window)!r} [ns], allowed: (t_lo, t_hi) with t_hi > t_lo")
        self.window = (float(window[0]), float(window[1]))
        self.tts = nn.Parameter(torch.as_tensor(tts, dtype=torch.float64).clone())
        self.first_hit = bool(first_hit)
        self.indirect = indirect
        self.tail_tau = float(tail_tau)
        self.mu_floor = float(mu_floor)
        self.register_buffer("below", sub_threshold_probs(float(threshold), float(spe_rel_var), gain))

    def below_rows(self, pmt: Tensor) -> Tensor | None:
        """Sub-threshold probabilities (R,K) of the PMTs ``pmt`` (R,), or None without a threshold."""
        if self.below.shape[-1] == 0:
            return None
        return self.below.expand(pmt.shape[0], -1) if self.below.dim() == 1 else self.below[pmt]

    def forward(self, pred: dict[str, Tensor], mu_dark: Tensor, obs: dict[str, Tensor]) -> Tensor:
        hit = obs["hit"]
        mu = pred["mu"]
        out = torch.zeros_like(mu)
        if not bool(hit.any()):
            return out
        idx = hit.nonzero(as_tuple=True)
        tts = self.tts.to(device=mu.device, dtype=mu.dtype).expand(mu.shape[-1])
        sigma2 = pred["t_var"][idx] + tts[idx[1]] ** 2
        mu_ind = pred.get("mu_indirect")
        mu_ind = torch.zeros_like(mu) if mu_ind is None else mu_ind
        mu_dark = mu_dark.expand_as(mu)
        t = obs["time"].to(mu.dtype)[idx]
        floor = self.mu_floor
        w = obs.get("mu_rel_var")
        rel_var = None if w is None else w.to(mu.dtype)[idx]
        # the flat light's window edges blurred by the TTS (module doc); no TTS at all: sharp edges (a PMT
        # with zero TTS among others: 1 ps)
        tts_i = tts[idx[1]]
        edge = None if bool((tts_i == 0).all()) else tts_i.abs().clamp_min(1e-3)
        below = self.below_rows(idx[1])
        if self.indirect == "flat":
            lp = time_log_density(
                t,
                mu[idx] + floor,
                pred["t_mean"][idx],
                sigma2,
                mu_ind[idx] + mu_dark[idx] + floor,
                self.window,
                first_hit=self.first_hit,
                rel_var=rel_var,
                edge_sigma=edge,
                below=below,
            )
        else:
            lp = time_log_density(
                t,
                mu[idx] + floor,
                pred["t_mean"][idx],
                sigma2,
                mu_dark[idx] + floor,
                self.window,
                mu_tail=mu_ind[idx] + floor,
                tail_tau=self.tail_tau,
                first_hit=self.first_hit,
                rel_var=rel_var,
                edge_sigma=edge,
                below=below,
            )
        return out.index_put(idx, -lp)


class HitLikelihood(nn.Module):
    """Per-event NLL (E,) = sum over PMTs of the charge term (+ the time term for hit PMTs).

    Args: spe_rel_var, threshold [p.e.], gain (see :class:`ChargeTerm`); dark_rate_hz [Hz] (scalar or (P,))
    and window (t_lo, t_hi) [ns] give mu_dark = R T; tts [ns]; use_time toggles the time term; first_hit and
    indirect ('flat' | 'tail', tail_tau [ns]) as in :class:`TimeTerm`.

    forward(pred, obs): pred from a ResponseModel -- mu (E,P) [p.e.], t_mean (E,P) [ns], t_var (E,P) [ns^2],
    optional mu_indirect (E,P); obs from :func:`hits_to_dense` (hit, charge, time), optionally with
    mu_rel_var (E,P), the relative variance of the direct expectation over fluctuations it averages over
    (negative-binomial counts, module doc; e.g. ``PhysicsResponse.ms_relative_variance``). NaN/inf in the
    hit charges/times, in mu_rel_var or in the prediction, negative mu_rel_var, or mismatched shapes, raise
    ConfigError.
    """

    def __init__(
        self,
        spe_rel_var: float,
        threshold: float = 0.0,
        window: tuple[float, float] = (-100.0, 400.0),
        dark_rate_hz: float | Tensor = 0.0,
        tts: float | Tensor = 1.0,
        gain: float | Tensor = 1.0,
        use_time: bool = True,
        first_hit: bool = True,
        indirect: str = "flat",
        tail_tau: float = 20.0,
        mu_floor: float = 1e-8,
    ) -> None:
        super().__init__()
        self.charge = ChargeTerm(spe_rel_var, threshold, gain, mu_floor)
        self.time = None
        if use_time:
            self.time = TimeTerm(
                window, tts, first_hit, indirect, tail_tau, mu_floor, threshold, spe_rel_var, gain
            )
        self.window = (float(window[0]), float(window[1]))
        width_s = (self.window[1] - self.window[0]) * 1e-9
        self.register_buffer("mu_dark", torch.as_tensor(dark_rate_hz, dtype=torch.float64) * width_s)

    def per_pmt(self, pred: dict[str, Tensor], obs: dict[str, Tensor]) -> Tensor:
        """Per-PMT NLL (E,P)."""
        mu = pred["mu"]
        hit = obs["hit"]
        if hit.shape != mu.shape:
            raise ConfigError(
                f"obs['hit']: shape {tuple(hit.shape)}, expected the prediction's {tuple(mu.shape)}"
            )
        for key in ("mu", "t_mean", "t_var", "mu_indirect"):
            if key in pred:
                _check_finite(f"prediction[{key!r}]", pred[key])
        _check_finite("obs['charge'] of hit PMTs", obs["charge"], hit)
        if self.time is not None:
            _check_finite("obs['time'] of hit PMTs", obs["time"], hit)
        mu_var = None
        if "mu_rel_var" in obs:
            w = obs["mu_rel_var"]
            if w.shape != mu.shape:
                raise ConfigError(
                    f"obs['mu_rel_var']: shape {tuple(w.shape)}, expected the prediction's {tuple(mu.shape)}"
                )
            _check_finite("obs['mu_rel_var']", w)
            if bool((w < 0).any()):
                raise ConfigError("obs['mu_rel_var']: negative relative variance; allowed: >= 0")
            mu_var = w.to(mu) * mu * mu
        if bool((mu < 0).any()):
            raise ConfigError("prediction['mu']: negative expected p.e.; allowed: mu >= 0")
        mu_dark = self.mu_dark.to(device=mu.device, dtype=mu.dtype)
        m = mu + mu_dark
        if "mu_indirect" in pred:
            m = m + pred["mu_indirect"]
        nll = self.charge(m, obs, mu_var)
        if self.time is not None:
            nll = nll + self.time(pred, mu_dark, obs)
        return nll

    def forward(self, pred: dict[str, Tensor], obs: dict[str, Tensor]) -> Tensor:
        return self.per_pmt(pred, obs).sum(-1)
