"""Per-PMT likelihood terms (fitting.likelihood): normalisation, robustness, consistency, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fitting.likelihood import (
    HitLikelihood,
    charge_log_density,
    hits_to_dense,
    sub_threshold_probs,
    time_log_density,
    unhit_log_prob,
)
from fitting.response import PhysicsResponse
from physics.config import ConfigError
from physics.geometry import Detector, cylinder_grid
from physics.medium import Medium
from physics.optics import Optics
from physics.sensors import PMTResponse

F64 = torch.float64


@pytest.mark.parametrize("mu", [0.05, 1.0, 6.0, 40.0])
def test_charge_density_integrates_to_one_minus_p0(mu):
    v = 0.3**2
    q = torch.linspace(-6.0, mu + 12 * math.sqrt(mu + 1) + 10, 6001, dtype=F64)
    dens = torch.exp(charge_log_density(q, torch.full_like(q, mu), v))
    integral = float(torch.trapezoid(dens, q))
    assert integral == pytest.approx(1 - math.exp(-mu), rel=1e-6, abs=1e-9)


def test_threshold_unhit_plus_hit_is_one():
    v, thr, mu = 0.5**2, 0.4, 0.8
    q = torch.linspace(thr, 30.0, 6001, dtype=F64)
    hit = float(torch.trapezoid(torch.exp(charge_log_density(q, torch.full_like(q, mu), v)), q))
    unhit = math.exp(float(unhit_log_prob(torch.tensor([mu], dtype=F64), v, thr)))
    assert hit + unhit == pytest.approx(1.0, abs=1e-6)
    assert unhit > math.exp(-mu)  # sub-threshold single p.e. count as unhit


@pytest.mark.parametrize("first_hit", [True, False])
def test_time_density_normalised(first_hit):
    t = torch.linspace(-100.0, 400.0, 200001, dtype=F64)
    lp = time_log_density(
        t,
        torch.tensor(3.0, dtype=F64),
        torch.tensor(40.0, dtype=F64),
        torch.tensor(1.5, dtype=F64),
        torch.tensor(0.2, dtype=F64),
        (-100.0, 400.0),
        mu_tail=torch.tensor(0.5, dtype=F64),
        tail_tau=15.0,
        first_hit=first_hit,
    )
    assert float(torch.trapezoid(torch.exp(lp), t)) == pytest.approx(1.0, abs=2e-4)


def test_flat_light_edges_blurred_by_tts_match_digitised_dark_hits():
    """Dark p.e. uniform in the window (-100, 400) ns, then the TTS jitter (physics.sensors.digitize): their
    times spill past the edges. The blurred box (edge_sigma = TTS) gives the sampled fractions beyond each
    edge and in 2 ns bins across it (400k samples, within 4 sampling errors), integrates to 1, and a dark hit
    0.5 ns past the edge costs log(W / Phi(-0.5 / TTS)) = 7.2 NLL units instead of the sharp box's 10^4 (its
    direct light 300 ns away, 2 ns wide); float64 gradcheck of the density in t, far outside the window
    included."""
    g = torch.Generator().manual_seed(3)
    lo, hi, tts, n = -100.0, 400.0, 1.5, 400_000
    t_mc = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    t_mc = t_mc + tts * torch.randn(n, generator=g, dtype=F64)

    def dens(t: torch.Tensor, sig, first_hit: bool = False) -> torch.Tensor:
        return time_log_density(
            t,
            *(torch.tensor(x, dtype=F64) for x in (1e-12, 100.0, 4.0, 0.05)),
            (lo, hi),
            first_hit=first_hit,
            edge_sigma=sig,
        ).exp()

    t = torch.linspace(lo - 20.0, hi + 20.0, 260001, dtype=F64)
    for first_hit in (False, True):
        assert float(torch.trapezoid(dens(t, tts, first_hit), t)) == pytest.approx(1.0, abs=1e-6)
    for a, b in ((hi, hi + 20), (lo - 20, lo), (hi - 2, hi), (hi, hi + 2), (lo - 2, lo), (lo + 2, lo + 4)):
        frac = float(((t_mc > a) & (t_mc < b)).double().mean())
        tb = torch.linspace(a, b, 4001, dtype=F64)
        model = float(torch.trapezoid(dens(tb, tts), tb))
        assert abs(model - frac) < 4 * math.sqrt(frac / n) + 1e-7, (a, b, model, frac)
    assert float(((t_mc > hi) | (t_mc < lo)).double().mean()) > 1e-3  # the sharp box would give 0
    past = torch.tensor([hi + 0.5], dtype=F64)
    nll_blur, nll_sharp = float(-dens(past, tts).log()), float(-dens(past, None).log())
    assert nll_blur == pytest.approx(math.log(hi - lo) - math.log(0.5 * math.erfc(0.5 / tts / math.sqrt(2))))
    assert nll_blur < 10.0 and nll_sharp > 1e4
    # HitLikelihood's time term blurs the edges by its own TTS
    like = HitLikelihood(0.1, window=(lo, hi), dark_rate_hz=4e3, tts=tts)
    mu_dark = like.mu_dark.double()
    pred = {k: torch.tensor([[v]], dtype=F64) for k, v in (("mu", 0.3), ("t_mean", 100.0), ("t_var", 2.0))}
    obs = {"hit": torch.tensor([[True]]), "charge": torch.tensor([[1.0]], dtype=F64), "time": past[None]}
    expect = time_log_density(
        past,
        *(torch.tensor(x, dtype=F64) for x in (0.3 + 1e-8, 100.0, 2.0 + tts**2, float(mu_dark) + 1e-8)),
        (lo, hi),
        edge_sigma=tts,
    )
    nll_time = float(like.time(pred, mu_dark, obs).detach())
    assert nll_time == pytest.approx(-float(expect), rel=1e-9)
    assert nll_time < 20.0  # 12.4: a dark hit, given 0.3 direct p.e.
    with pytest.raises(ConfigError, match=r"edge_sigma: got -1 ns"):
        dens(past, torch.tensor([1.5, -1.0], dtype=F64))
    tt = torch.tensor([lo - 50.0, lo, 0.0, hi - 1.0, hi + 3.0, hi + 200.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: time_log_density(
            x, *(torch.tensor(v, dtype=F64) for v in (2.0, 100.0, 4.0, 0.5)), (lo, hi), edge_sigma=tts
        ),
        (tt,),
    )


def _first_arrivals(rate: torch.Tensor, m: float, s: float, g: torch.Generator) -> torch.Tensor:
    """Earliest of n ~ Poisson(rate) Gaussian N(m, s^2) arrival times, for the events with n >= 1."""
    n = torch.poisson(rate, generator=g).long()
    n = n[n > 0]
    ev = torch.repeat_interleave(torch.arange(n.numel()), n)
    times = m + s * torch.randn(ev.numel(), generator=g, dtype=F64)
    return torch.full((n.numel(),), float("inf"), dtype=F64).scatter_reduce(0, ev, times, reduce="amin")


def _first_hit_density(t: torch.Tensor, mu: float, m: float, s: float, rel_var=None) -> torch.Tensor:
    """time_log_density's first-hit density of mu p.e. around N(m, s^2) (no other light), window (-20, 40)."""
    return torch.exp(
        time_log_density(
            t,
            torch.tensor(mu, dtype=F64),
            torch.tensor(m, dtype=F64),
            torch.tensor(s * s, dtype=F64),
            torch.tensor(1e-12, dtype=F64),
            (-20.0, 40.0),
            rel_var=rel_var,
        )
    )


def test_first_hit_density_matches_sampling():
    """Earliest of Poisson(mu) Gaussian arrival times: mean from the density vs a sampled mean."""
    g = torch.Generator().manual_seed(0)
    mu, m, s = 8.0, 10.0, 1.2
    first = _first_arrivals(torch.full((200_000,), mu, dtype=F64), m, s, g)
    t = torch.linspace(-20.0, 40.0, 60001, dtype=F64)
    p = _first_hit_density(t, mu, m, s)
    mean_model = float(torch.trapezoid(p * t, t))
    err = float(first.std()) / math.sqrt(first.numel())
    assert abs(mean_model - float(first.mean())) < 4 * err
    assert mean_model < m - 1.0  # the first of ~8 p.e. is well before the single-p.e. mean


def test_gamma_mixed_first_hit_density_matches_sampling():
    """Over-dispersed direct light (rel_var w): rate G mu N(t; m, s^2) with G ~ Gamma(mean 1, variance w).
    The closed form (Gamma Laplace transform) integrates to 1 and gives the sampled mean and 10/50/90 %
    quantiles of the earliest p.e. given >= 1 (400k sampled events); the Poisson form with the same mean puts
    it 0.15 ns (84 sampling errors) too early, so the check can fail. float64 gradcheck in mu, m, w."""
    g = torch.Generator().manual_seed(1)
    mu, m, s, w = 6.0, 10.0, 1.2, 0.8
    gam = torch.distributions.Gamma(torch.tensor(1.0 / w, dtype=F64), torch.tensor(1.0 / w, dtype=F64))
    torch.manual_seed(1)
    first = _first_arrivals(gam.sample((400_000,)) * mu, m, s, g)
    t = torch.linspace(-20.0, 40.0, 60001, dtype=F64)
    err = float(first.std()) / math.sqrt(first.numel())
    p = _first_hit_density(t, mu, m, s, torch.tensor(w, dtype=F64))
    assert float(torch.trapezoid(p, t)) == pytest.approx(1.0, abs=1e-6)
    mean_mix = float(torch.trapezoid(p * t, t))
    assert abs(mean_mix - float(first.mean())) < 4 * err
    cdf = torch.cumulative_trapezoid(p, t)
    for q in (0.1, 0.5, 0.9):
        t_q = float(t[1:][torch.searchsorted(cdf, torch.tensor(q, dtype=F64))])
        assert t_q == pytest.approx(float(torch.quantile(first[:200_000], q)), abs=0.02)
    p0 = _first_hit_density(t, mu, m, s)
    assert float(first.mean()) - float(torch.trapezoid(p0 * t, t)) > 20 * err
    args = [torch.tensor(x, dtype=F64, requires_grad=True) for x in (mu, m, w)]
    tt = torch.tensor([7.0, 9.5, 12.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: time_log_density(
            tt, a, b, torch.tensor(s * s, dtype=F64), torch.tensor(0.01, dtype=F64), (-20.0, 40.0), rel_var=c
        ),
        args,
    )


def test_poisson_threshold_sums_equal_the_general_form():
    """Without over-dispersion time_log_density sums the sub-threshold terms in closed form (binomial
    theorem: O(K) products); the general Gamma-mixture double sum with w = 0 (every Gamma moment 1) must give
    the same log density and gradients to rounding, with SK's 8 sub-threshold terms, tail light and PMTs
    from 0.01 to 200 p.e."""
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(-50.0, 150.0, 401, dtype=F64)[:, None]
    mu = torch.tensor([0.01, 0.7, 5.0, 40.0, 200.0], dtype=F64)
    args = [
        (mu * (1 + 0.1 * torch.rand(5, generator=g, dtype=F64))).requires_grad_(),
        (10.0 + 20.0 * torch.rand(5, generator=g, dtype=F64)).requires_grad_(),
        (1.0 + 3.0 * torch.rand(5, generator=g, dtype=F64)).requires_grad_(),
        (0.05 + 0.2 * torch.rand(5, generator=g, dtype=F64)).requires_grad_(),
    ]
    tail = torch.tensor([0.0, 0.3, 1.0, 2.0, 5.0], dtype=F64).requires_grad_()
    below = sub_threshold_probs(0.25, 0.21)
    assert below.shape == (8,)
    outs = []
    for rv in (None, torch.zeros(5, dtype=F64)):
        lp = time_log_density(t, *args, (-100.0, 400.0), mu_tail=tail + 1e-9, rel_var=rv, below=below)
        grads = torch.autograd.grad(lp.sum(), [*args, tail])
        outs.append((lp.detach(), grads))
    (a, ga), (b, gb) = outs
    assert bool(torch.isfinite(a).all())
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_first_hit_density_with_threshold_matches_sampling():
    """A hit needs summed charge >= threshold (physics.sensors: first_hit_digitize), so a lone p.e. that falls
    below it leaves no hit and the hits come from PMTs with more p.e.: earlier. Direct light mu N(10, 1.2^2)
    (Poisson, and Gamma-mixed with w = 0.8) plus flat light over the window, single-p.e. charges N(1, 0.25)
    (so n p.e. sum to N(n, n v), the likelihood's charge model), threshold 0.6 p.e. (f_1 = 0.21), 400k
    sampled events: the threshold density integrates to 1 and gives the sampled mean and 10/50/90 % quantiles
    of the hit time and, through its normaliser, the charge term's hit probability (1 - exp(unhit_log_prob));
    without the threshold the mean is 0.2 ns (> 12 sampling errors) late, so the check can fail. float64
    gradcheck in every input, tail light included."""
    g = torch.Generator().manual_seed(5)
    n_ev, mu, m, s, flat, v, thr, lo, hi = 400_000, 1.5, 10.0, 1.2, 0.3, 0.25, 0.6, -20.0, 40.0
    below = sub_threshold_probs(thr, v)
    assert below.shape == (10,) and float(below[0]) == pytest.approx(0.5 * math.erfc(0.4 / math.sqrt(0.5)))
    assert sub_threshold_probs(0.0, v).shape == (0,)
    assert sub_threshold_probs(thr, v, torch.tensor([1.0, 2.0], dtype=F64)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"gain: got -1"):
        sub_threshold_probs(thr, v, torch.tensor([1.0, -1.0]))
    with pytest.raises(ConfigError, match=r"threshold: got 50 p.e."):
        sub_threshold_probs(50.0, v)
    t = torch.linspace(lo, hi, 60001, dtype=F64)
    args = [torch.tensor(x, dtype=F64) for x in (mu, m, s * s, flat)]
    for w in (None, 0.8):
        lam = torch.full((n_ev,), mu, dtype=F64)
        if w is not None:
            lam = lam * w * torch._standard_gamma(torch.full((n_ev,), 1 / w, dtype=F64), generator=g)
        nd = torch.poisson(lam, generator=g).long()
        nf = torch.poisson(torch.full((n_ev,), flat, dtype=F64), generator=g).long()
        ev = torch.repeat_interleave(torch.arange(n_ev).repeat(2), torch.cat([nd, nf]))
        times = torch.cat(
            [
                m + s * torch.randn(int(nd.sum()), generator=g, dtype=F64),
                lo + (hi - lo) * torch.rand(int(nf.sum()), generator=g, dtype=F64),
            ]
        )
        q = 1.0 + math.sqrt(v) * torch.randn(times.numel(), generator=g, dtype=F64)
        q_sum = torch.zeros(n_ev, dtype=F64).index_add(0, ev, q)
        first = torch.full((n_ev,), math.inf, dtype=F64).scatter_reduce(0, ev, times, reduce="amin")
        hit = (nd + nf > 0) & (q_sum >= thr)
        t_hit = first[hit]
        err = float(t_hit.std()) / math.sqrt(t_hit.numel())
        rv = None if w is None else torch.tensor(w, dtype=F64)
        p = time_log_density(t, *args, (lo, hi), rel_var=rv, below=below).exp()
        assert float(torch.trapezoid(p, t)) == pytest.approx(1.0, abs=1e-6)
        mean = float(torch.trapezoid(p * t, t))
        assert abs(mean - float(t_hit.mean())) < 4 * err, (w, mean, float(t_hit.mean()), err)
        cdf = torch.cumulative_trapezoid(p, t)
        for qq in (0.1, 0.5, 0.9):
            t_q = float(t[1:][torch.searchsorted(cdf, torch.tensor(qq, dtype=F64))])
            assert t_q == pytest.approx(float(torch.quantile(t_hit[:200_000], qq)), abs=0.1), (w, qq)
        p_none = time_log_density(t, *args, (lo, hi), rel_var=rv).exp()
        assert float(torch.trapezoid(p_none * t, t)) - float(t_hit.mean()) > 12 * err
        if w is None:  # the normaliser is the charge term's hit probability
            p_hit = -math.expm1(float(unhit_log_prob(torch.tensor(mu + flat, dtype=F64), v, thr)))
            frac = float(hit.double().mean())
            assert abs(frac - p_hit) < 4 * math.sqrt(p_hit * (1 - p_hit) / n_ev), (frac, p_hit)
    xs = [torch.tensor(x, dtype=F64, requires_grad=True) for x in (mu, m, s * s, flat, 0.4, 0.8)]
    tt = torch.tensor([-25.0, 0.0, 8.0, 10.5, 14.0, 39.0, 45.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e, r: time_log_density(
            tt, a, b, c, d, (lo, hi), mu_tail=e, rel_var=r, edge_sigma=1.0, below=below
        ),
        xs,
    )


def _sample_hits(mu: torch.Tensor, t_mean: torch.Tensor, sigma: float, v: float, gen: torch.Generator):
    """Hits from the model itself: Poisson p.e., Gaussian charge sum, first Gaussian arrival time."""
    n = torch.poisson(mu, generator=gen)
    q = n + torch.sqrt(n * v) * torch.randn(mu.shape, generator=gen, dtype=F64)
    # first of n Gaussian times: inverse CDF of the minimum, F_min = 1 - (1 - Phi)^n
    u = torch.rand(mu.shape, generator=gen, dtype=F64)
    p = 1 - (1 - u) ** (1 / n.clamp_min(1))
    t = t_mean + sigma * torch.special.ndtri(p.clamp(1e-15, 1 - 1e-15))
    hit = n > 0
    return {"hit": hit, "charge": torch.where(hit, q, 0.0), "time": torch.where(hit, t, 0.0)}


def test_nll_minimum_at_true_scale():
    """For hits sampled from the model, the NLL of a scaled mu is minimal at scale 1 (within 3 sigma)."""
    gen = torch.Generator().manual_seed(1)
    p = 6000
    mu = 0.02 + 30 * torch.rand(1, p, generator=gen, dtype=F64) ** 2
    t_mean = 20 * torch.rand(1, p, generator=gen, dtype=F64)
    tts, v = 1.0, 0.3**2
    obs = _sample_hits(mu, t_mean, tts, v, gen)
    like = HitLikelihood(spe_rel_var=v, tts=tts, window=(-50.0, 100.0)).double()
    t_var = torch.zeros_like(mu)

    def nll(scale: torch.Tensor) -> torch.Tensor:
        return like({"mu": mu * scale, "t_mean": t_mean, "t_var": t_var}, obs).sum()

    s = torch.tensor(1.0, dtype=F64, requires_grad=True)
    for _ in range(5):  # Newton iterations in the scale
        (g,) = torch.autograd.grad(nll(s), s, create_graph=True)
        (h,) = torch.autograd.grad(g, s)
        with torch.no_grad():
            s -= g / h
    (g,) = torch.autograd.grad(nll(s), s, create_graph=True)
    (h,) = torch.autograd.grad(g, s)
    sigma = 1 / math.sqrt(float(h))
    assert abs(float(g)) < 1e-6 * float(h)
    assert abs(float(s) - 1) < 3 * sigma, (float(s), sigma)
    assert sigma < 0.02


def test_robust_edges_and_bad_input():
    like = HitLikelihood(spe_rel_var=0.09, threshold=0.25, tts=0.8, dark_rate_hz=0.0).double()
    mu = torch.tensor([[0.0, 1e-30, 4800.0, 2.0]], dtype=F64, requires_grad=True)
    tm = torch.tensor([[0.0, 5.0, 10.0, 500.0]], dtype=F64, requires_grad=True)
    obs = {
        "hit": torch.tensor([[True, True, True, False]]),
        "charge": torch.tensor([[1.0, 3.0, 5000.0, 0.0]], dtype=F64),
        "time": torch.tensor([[1.0, 5.0, 9.0, 0.0]], dtype=F64),
    }
    out = like({"mu": mu, "t_mean": tm, "t_var": torch.zeros_like(mu)}, obs)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(tm.grad).all()
    bad = dict(obs, charge=torch.tensor([[float("nan"), 3.0, 5000.0, 0.0]], dtype=F64))
    with pytest.raises(ConfigError, match="charge"):
        like({"mu": mu, "t_mean": tm, "t_var": torch.zeros_like(mu)}, bad)
    with pytest.raises(ConfigError, match="mu"):
        like({"mu": mu * float("nan"), "t_mean": tm, "t_var": torch.zeros_like(mu)}, obs)
    with pytest.raises(ConfigError, match="hits.charge"):
        hits_to_dense(
            torch.tensor([0]), torch.tensor([float("nan")]), torch.tensor([1.0]), torch.tensor([0]), 1, 4
        )
    dense = hits_to_dense(
        torch.tensor([2, 0]), torch.tensor([1.5, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([0, 1]), 2, 4
    )
    assert dense["hit"].sum() == 2 and float(dense["charge"][0, 2]) == 1.5


def test_nll_gradcheck_event_and_detector_parameters():
    pos, nrm = cylinder_grid(1.0, 2.0, 0.08, 0.7)
    det = Detector("t", "cylinder", 1.0, 2.0, pos, nrm, torch.full((len(pos),), 0.08, dtype=F64)).to(
        dtype=F64
    )
    med = Medium.load("water").double()
    sen = PMTResponse.load("default", n_pmts=det.n_pmts).double()
    resp = PhysicsResponse(det, med, sen, "mu-", Optics(wall_reflectivity=0.0), n_track_nodes=16)
    cfg = resp.likelihood_config()
    cfg["dark_rate_hz"] = 1e5
    like = HitLikelihood(**cfg, window=(-20.0, 60.0)).double()
    gen = torch.Generator().manual_seed(4)
    ev0 = {
        "vertex": torch.tensor([[0.1, -0.2, -0.3]], dtype=F64),
        "direction": torch.tensor([[0.3, 0.1, 0.9]], dtype=F64),
        "energy": torch.tensor([300.0], dtype=F64),
        "t0": torch.tensor([1.0], dtype=F64),
    }
    with torch.no_grad():
        pred = resp.expected(ev0)
    obs = _sample_hits(pred["mu"] + 0.05, pred["t_mean"], 1.0, cfg["spe_rel_var"], gen)

    def f(v, d, e, t0, abs_s, qe, toff, tts):
        params = {"medium.abs_scale": abs_s, "sensors.qe_scale": qe, "sensors.time_offset": toff}
        pr = torch.func.functional_call(resp, params, ({"vertex": v, "direction": d, "energy": e, "t0": t0},))
        return torch.func.functional_call(like, {"time.tts": tts}, (pr, obs))

    p = det.n_pmts
    args = tuple(
        x.clone().requires_grad_()
        for x in (
            ev0["vertex"],
            ev0["direction"],
            ev0["energy"],
            ev0["t0"],
            torch.tensor(1.0, dtype=F64),
            torch.linspace(0.9, 1.1, p, dtype=F64),
            torch.linspace(-0.5, 0.5, p, dtype=F64),
            torch.tensor(0.75, dtype=F64),
        )
    )
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# over-dispersed (negative-binomial) counts: obs['mu_rel_var']
# --------------------------------------------------------------------------------------------------
def _gamma_poisson_quad(n: int, m: float, r: float) -> float:
    """P(n) of a Poisson whose mean is Gamma(shape 1/r, mean m) distributed, by quadrature over the mean
    (the mixture's definition; scipy.integrate.quad)."""
    from scipy import integrate, stats

    k = 1.0 / r
    lam = stats.gamma(k, scale=m / k)
    hi = lam.ppf(1 - 1e-14)  # from 0: a small count's probability comes from the mean's lower tail
    val, _ = integrate.quad(
        lambda x: stats.poisson.pmf(n, x) * lam.pdf(x),
        0.0,
        hi,
        points=[min(n, m), m],
        limit=400,
        epsabs=0,
        epsrel=1e-11,
    )
    return val


@pytest.mark.parametrize("m,r", [(0.3, 0.5), (4.0, 0.35), (25.0, 0.1), (60.0, 0.02)])
def test_negative_binomial_counts_are_the_gamma_mixed_poisson(m, r):
    """log P(n) with mu_var = r m^2 equals the Gamma-Poisson mixture computed by quadrature over the mean."""
    from fitting.likelihood import _log_count

    ns = [0, 1, 2, 5, int(m), int(m + 3 * math.sqrt(m + r * m * m)) + 1]
    n = torch.tensor(ns, dtype=F64)
    got = _log_count(n, torch.full_like(n, m), torch.full_like(n, r * m * m))
    for i, nn in enumerate(ns):
        ref = math.log(_gamma_poisson_quad(nn, m, r))
        assert abs(float(got[i]) - ref) < 1e-7 * max(1.0, abs(ref)), (nn, float(got[i]), ref)


def test_negative_binomial_poisson_limit_is_smooth():
    """As r -> 0 the negative binomial tends to the Poisson law as log NB - log Poisson = r ((n - m)^2 - n)/2
    + O(r^2) (expansion of the Gamma mixture), down to and across the switch to the exact Poisson form."""
    from fitting.likelihood import _log_count, _log_poisson

    m = 40.0
    n = torch.tensor([10.0, 30.0, 40.0, 55.0, 90.0], dtype=F64)
    for r in (1e-4, 1e-7, 1e-10, 1e-11):
        mm = torch.full_like(n, m)
        diff = _log_count(n, mm, torch.full_like(n, r * m * m)) - _log_poisson(n, mm)
        first = r * ((n - m) ** 2 - n) / 2
        assert torch.allclose(diff, first, rtol=0.02, atol=1e-12), (r, diff, first)
    zero = _log_count(n, torch.full_like(n, m), torch.zeros_like(n))
    assert torch.equal(zero, _log_poisson(n, torch.full_like(n, m)))


@pytest.mark.parametrize("m,r", [(0.2, 0.6), (2.5, 0.4), (18.0, 0.3)])
def test_over_dispersed_charge_density_and_no_hit_sum_to_one(m, r):
    """Threshold 0.25 p.e.: the hit-charge density integrated above threshold plus P(no hit) is 1, and at
    threshold 0 P(no hit) is the negative binomial's P(0) = (1 + r m)^(-1/r)."""
    v, thr = 0.3**2, 0.25
    mv = torch.tensor(r * m * m, dtype=F64)
    q = torch.linspace(thr, 12 * m + 60, 200001, dtype=F64)
    dens = torch.exp(charge_log_density(q, torch.full_like(q, m), v, 1.0, mv.expand_as(q)))
    hit = float(torch.trapezoid(dens, q))
    unhit = math.exp(float(unhit_log_prob(torch.tensor(m, dtype=F64), v, thr, 1.0, mv)))
    assert abs(hit + unhit - 1.0) < 2e-5
    p0 = math.exp(float(unhit_log_prob(torch.tensor(m, dtype=F64), v, 0.0, 1.0, mv)))
    assert p0 == pytest.approx((1 + r * m) ** (-1 / r), rel=1e-12)


def test_over_dispersed_likelihood_gradcheck_and_bad_input():
    """float64 gradcheck of the per-PMT NLL with obs['mu_rel_var'] w.r.t. mu (hit and unhit PMTs, w = 0 and
    mu -> 0 edges included); mu_rel_var of the wrong shape, negative or NaN is a ConfigError naming it."""
    like = HitLikelihood(spe_rel_var=0.09, threshold=0.25, dark_rate_hz=300.0, window=(-100.0, 400.0))
    hit = torch.tensor([[True, False, True, False, True, False]])
    obs = {
        "hit": hit,
        "charge": torch.tensor([[2.3, 0.0, 0.6, 0.0, 14.0, 0.0]], dtype=F64),
        "time": torch.tensor([[5.0, 0.0, 7.0, 0.0, 6.0, 0.0]], dtype=F64),
        "mu_rel_var": torch.tensor([[0.4, 0.3, 0.0, 0.5, 0.2, 0.7]], dtype=F64),
    }
    t_mean = torch.full((1, 6), 6.0, dtype=F64)
    t_var = torch.full((1, 6), 0.5, dtype=F64)

    def f(mu):
        return like.per_pmt({"mu": mu, "t_mean": t_mean, "t_var": t_var}, obs)

    mu = torch.tensor([[1.7, 0.4, 0.9, 1e-4, 11.0, 3.0]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (mu,))
    assert torch.autograd.gradgradcheck(f, (mu,))
    nll_nb = f(mu).detach()
    nll_p = like.per_pmt(
        {"mu": mu, "t_mean": t_mean, "t_var": t_var}, {k: v for k, v in obs.items() if k != "mu_rel_var"}
    ).detach()
    assert float(nll_nb[0, 2]) == pytest.approx(float(nll_p[0, 2]), abs=1e-12)  # w = 0: Poisson
    assert torch.isfinite(nll_nb).all() and float((nll_nb - nll_p).abs().max()) > 0.01
    # the charge term takes the negative binomial only where w > 0 (the Poisson form elsewhere): the same
    # values as the two densities evaluated with mu_var on every PMT
    ct = like.charge
    m = mu.detach() + like.mu_dark
    mv = obs["mu_rel_var"] * mu.detach() ** 2
    mf = m + ct.mu_floor
    ref = torch.where(
        hit,
        -charge_log_density(obs["charge"], mf, ct.rel_var, 1.0, mv),
        -unhit_log_prob(mf, ct.rel_var, ct.threshold, 1.0, mv),
    )
    assert torch.allclose(ct(m, obs, mv), ref, rtol=1e-13, atol=1e-13)
    for bad, msg in [
        (torch.zeros(1, 5, dtype=F64), "shape"),
        (torch.full((1, 6), -0.1, dtype=F64), "negative"),
        (torch.full((1, 6), float("nan"), dtype=F64), "non-finite"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            like.per_pmt({"mu": mu.detach(), "t_mean": t_mean, "t_var": t_var}, {**obs, "mu_rel_var": bad})
