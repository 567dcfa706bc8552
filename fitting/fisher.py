"""Expected Fisher information and Cramér–Rao bounds for event reconstruction (design §5).

The data model is the one :class:`fitting.likelihood.HitLikelihood` writes down (so the bound belongs to the
same NLL that :func:`fitting.reconstruct.reconstruct` minimises). Per PMT i with direct light mu_i, optional
indirect light mu_ind,i and dark p.e. mu_dark (all [p.e.]), m_i = mu_i + mu_ind,i + mu_dark:

* charge/hit: y_i in {unhit} u [thr, inf) with P(unhit) = U(m) and density
  p(q) = sum_{n>=1} Poisson(n|m) N(q; n g, n v g^2) for q >= thr (g gain, v relative single-p.e. variance);
* hit time t_i (only when hit): the first-p.e. density
  f(t) = lambda(t) exp(-Lambda(t)) / (1 - exp(-Lambda_tot)) of :func:`fitting.likelihood.time_log_density`,
  taken independent of the charge given a hit (as the likelihood does).

The expected (Fisher) information of independent observations adds up (Fisher 1925; Cramér, Mathematical
Methods of Statistics, 1946, sec. 32.3; Rao, Bull. Calcutta Math. Soc. 37 (1945) 81). With theta the event
parameters and J the Jacobians of the per-PMT expectations,

    F(theta) = sum_i I_q(m_i) (dm_i/dtheta)(dm_i/dtheta)^T  +  sum_i P_hit,i  J_t,i^T G_i J_t,i,

* I_q(m) = U'(m)^2 / U(m) + int_thr^inf (d p(q)/dm)^2 / p(q) dq is the information about m in one PMT's
  charge/hit variable (1-D quadrature, :func:`charge_information`). For a pure Poisson count (exact charge,
  no threshold) it is 1/m, giving the familiar F = sum_i grad mu_i grad mu_i^T / mu_i (e.g. Cowan,
  Statistical Data Analysis, 1998, sec. 6.6; Barlow & Beeston for binned Poisson data);
* G_i = E_f[s s^T], s = d log f(t) / d(mu, t_mean, sigma^2[, mu_ind]) is the information of the hit time
  (the expectation of the score outer product, quadrature over t, :func:`time_information`); the cross term
  between charge and time vanishes because E_f[s] = 0 for the normalised time density.

Cramér–Rao: any unbiased estimator has Cov >= F^-1 (the "CRB covariance"); the maximum-likelihood
estimator reaches it asymptotically. The bound here assumes the model is the truth: real MC with muon
multiple scattering, delta rays or shower fluctuations that the expected model averages over can do worse.
For a muon's multiple scattering, :func:`hybrid_fisher` gives the bound with the kinks as random nuisance
parameters (each event one bent track), a lower bound for the data as they are.

Parametrisation (``LOCAL_NAMES``): the local coordinates of :func:`fitting.reconstruct.reconstruct`'s
covariance -- vertex (3) [m], two tangent angles a, b [rad] of the direction d = normalise(d0 + a e1 + b e2)
(e1, e2 from :func:`tangent_basis`), log(E / MeV), t0 [ns] -- about the true parameters. Other
parametrisations (e.g. a source's log photon number) are passed as ``param_map``.

Derivatives of the response: reverse-over-reverse ("double-vjp") products, Jacobian columns
J e_j = d/du [ (J^T u) . e_j ], which needs only double back-propagation (works for every stage that the
reconstruction's Hessian already differentiates twice, including the cascade model's incomplete gamma).
Units: m, ns, MeV, p.e.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from physics.config import ConfigError, check_number

from .likelihood import time_log_density, unhit_log_prob
from .uncertainty import kink_mode_offsets, kink_modes, tangent_basis

__all__ = [
    "LOCAL_NAMES",
    "tangent_basis",
    "local_param_map",
    "response_jacobian",
    "poisson_fisher",
    "charge_information",
    "charge_information_exact",
    "time_information",
    "gauss_legendre_nodes",
    "event_fisher",
    "hybrid_fisher",
    "crb_covariance",
    "crb_quantiles",
]

LOCAL_NAMES = ("x", "y", "z", "dir_a", "dir_b", "log_e", "t0")
LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------
# parametrisation (the same local coordinates as fitting.reconstruct's covariance)
# ----------------------------------------------------------------------------------------------------------
def local_param_map(
    params: dict[str, Tensor],
) -> tuple[Callable[[Tensor], dict[str, Tensor]], dict[str, Tensor]]:
    """Local 7-parameter chart about ``params`` (vertex (E,3) [m], direction (E,3), energy (E,) [MeV],
    optional t0 (E,) [ns]); returns (map y (E,7) -> event-parameter dict, basis dict with d, e1, e2)."""
    v = params["vertex"].to(torch.float64)
    d = params["direction"].to(torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    loge = torch.log(params["energy"].to(torch.float64))
    t0 = params.get("t0")
    t0 = torch.zeros_like(loge) if t0 is None else t0.to(torch.float64)
    e1, e2 = tangent_basis(d)

    def f(y: Tensor) -> dict[str, Tensor]:
        dd = d + y[:, 3:4] * e1 + y[:, 4:5] * e2
        return {
            "vertex": v + y[:, 0:3],
            "direction": dd / dd.norm(dim=-1, keepdim=True),
            "energy": torch.exp(loge + y[:, 5]),
            "t0": t0 + y[:, 6],
        }

    return f, {"d": d, "e1": e1, "e2": e2}


def response_jacobian(
    response: Any,
    param_map: Callable[[Tensor], dict[str, Tensor]],
    y0: Tensor,
    keys: tuple[str, ...] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Values (E,P) and Jacobians (E,P,k) of the response outputs w.r.t. the k event parameters y (E,k).

    Double-vjp: g(u) = J^T u by one reverse pass with create_graph, then column j = d(g_j)/du (k more reverse
    passes, batched over events because events are independent). keys default: mu, t_mean, t_var and
    mu_indirect when the model returns it. Outputs that do not depend on y get zero Jacobians."""
    y = y0.detach().clone().requires_grad_()
    pred = response.expected(param_map(y))
    if keys is None:
        keys = tuple(k for k in ("mu", "t_mean", "t_var", "mu_indirect") if k in pred)
    u = {k: torch.zeros_like(pred[k], requires_grad=True) for k in keys}
    s = sum((pred[k] * u[k]).sum() for k in keys)
    (g,) = torch.autograd.grad(s, y, create_graph=True)
    cols: dict[str, list[Tensor]] = {k: [] for k in keys}
    n_par = y.shape[1]
    for j in range(n_par):
        if g.requires_grad:
            gr = torch.autograd.grad(
                g[:, j].sum(), [u[k] for k in keys], retain_graph=j < n_par - 1, allow_unused=True
            )
        else:
            gr = [None] * len(keys)
        for k, gk in zip(keys, gr, strict=True):
            cols[k].append(torch.zeros_like(pred[k]) if gk is None else gk.detach())
    vals = {k: pred[k].detach() for k in keys}
    return vals, {k: torch.stack(cols[k], -1) for k in keys}


# ----------------------------------------------------------------------------------------------------------
# charge / hit information
# ----------------------------------------------------------------------------------------------------------
def poisson_fisher(mu: Tensor, jac: Tensor) -> Tensor:
    """Fisher information (E,k,k) of independent Poisson counts n_i ~ Poisson(mu_i(theta)):
    F = sum_i (d mu_i/d theta)(d mu_i/d theta)^T / mu_i (exact; e.g. Cowan 1998, sec. 6.6).
    mu (E,P) [p.e.], jac (E,P,k); PMTs with mu = 0 carry no information and are skipped."""
    w = torch.where(mu > 0, 1.0 / mu.clamp_min(1e-300), torch.zeros_like(mu))
    return torch.einsum("ep,epi,epj->eij", w, jac, jac)


def _simpson(n: int, dtype: torch.dtype) -> Tensor:
    """Composite Simpson weights on n (odd) equally spaced points, unit spacing."""
    w = torch.ones(n, dtype=dtype)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    return w / 3.0


def charge_information_exact(
    m_nodes: Tensor, rel_var: float, threshold: float = 0.0, n_q: int = 1501
) -> Tensor:
    """I_q(m) = U'^2/U + int_thr^inf (dp/dm)^2/p dq, HitLikelihood charge model at gain 1 (M,) [1/p.e.^2].

    p(q) = sum_n Poisson(n|m) N(q; n, n v); dp/dm = sum_n Poisson(n|m)(n/m - 1) N(q; n, n v), so
    (dp/dm)^2/p = p r^2 with r = sum_n softmax_n(log Poisson + log N) (n/m - 1) (log-sum-exp, no underflow).
    U = exp(-m) + sum_n Poisson(n|m) Phi((thr - n)/sqrt(n v)) (exp(-m) at thr <= 0, as the likelihood).
    Sum over n in [m - 12 sqrt(m) - 12, m + 12 sqrt(m) + 12]; q by Simpson on n_q points from
    max(thr, lowest component - 10 sd) to the highest component + 10 sd. Loop over the M nodes (table
    building); float64 on the nodes' device."""
    v = float(rel_var)
    out = torch.empty_like(m_nodes, dtype=torch.float64)
    dev = m_nodes.device
    if n_q % 2 == 0:
        n_q += 1
    wq = _simpson(n_q, torch.float64).to(dev)
    for i, m in enumerate(m_nodes.tolist()):
        sq = math.sqrt(m)
        n_lo = max(1.0, math.floor(m - 12.0 * sq - 12.0))
        n_hi = math.ceil(m + 12.0 * sq + 12.0)
        n = torch.arange(n_lo, n_hi + 1.0, dtype=torch.float64, device=dev)
        log_pois = n * math.log(m) - m - torch.lgamma(n + 1.0)
        score_n = n / m - 1.0
        # unhit
        if threshold <= 0.0:
            i_unhit = math.exp(-m)
        else:
            z = (threshold - n) / torch.sqrt(n * v)
            terms = torch.cat(
                [torch.tensor([-m], dtype=torch.float64, device=dev), log_pois + torch.special.log_ndtr(z)]
            )
            log_u = torch.logsumexp(terms, 0)
            wts = torch.exp(terms - log_u)
            r_u = float(
                (wts * torch.cat([torch.tensor([-1.0], dtype=torch.float64, device=dev), score_n])).sum()
            )
            i_unhit = math.exp(float(log_u)) * r_u * r_u
        # hit charges
        q_lo = n_lo - 10.0 * math.sqrt(n_lo * v) - 1.0
        if threshold > 0.0:
            q_lo = max(q_lo, threshold)
        q_hi = n_hi + 10.0 * math.sqrt(n_hi * v) + 1.0
        i_hit = 0.0
        if q_hi > q_lo:
            q = torch.linspace(q_lo, q_hi, n_q, dtype=torch.float64, device=dev)
            var = n[:, None] * v
            lw = (
                log_pois[:, None]
                - (q[None, :] - n[:, None]) ** 2 / (2.0 * var)
                - 0.5 * (LOG_2PI + torch.log(var))
            )
            log_p = torch.logsumexp(lw, 0)
            r = (torch.softmax(lw, 0) * score_n[:, None]).sum(0)
            i_hit = float((wq * torch.exp(log_p) * r * r).sum()) * (q_hi - q_lo) / (n_q - 1)
        out[i] = i_unhit + i_hit
    return out


_TABLES: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}
M_LO, M_HI, NODES_PER_DECADE = 1e-4, 1e3, 12


def _charge_table(rel_var: float, thr: float) -> tuple[Tensor, Tensor]:
    key = (round(float(rel_var), 12), round(float(thr), 12))
    if key not in _TABLES:
        n = int(round(math.log10(M_HI / M_LO) * NODES_PER_DECADE)) + 1
        logm = torch.linspace(math.log(M_LO), math.log(M_HI), n, dtype=torch.float64)
        info = charge_information_exact(torch.exp(logm), rel_var, thr)
        _TABLES[key] = (logm, torch.log(torch.exp(logm) * info))
    return _TABLES[key]


def charge_information(
    m: Tensor, rel_var: float, threshold: float = 0.0, gain: Tensor | float = 1.0
) -> Tensor:
    """Fisher information about the mean p.e. m in one PMT's hit/charge observation, any shape [1/p.e.^2].

    Gain g rescales charge and threshold together, so I depends on (m, v, thr/g) only. Evaluated from a table
    of :func:`charge_information_exact` (log-spaced m in [1e-4, 1e3], 12 nodes per decade, cached per
    (v, thr/g)), interpolated linearly in (log m, log(m I)); below 1e-4 m I is held constant (its m -> 0 limit
    is P(q >= thr | one p.e.), reached to O(m)); above 1e3 the compound-Poisson Gaussian limit
    N(m, m (1 + v)): I = 1/(m (1 + v)) + 1/(2 m^2)."""
    g = torch.as_tensor(gain, dtype=torch.float64)
    if g.numel() == 1:
        groups = [(float(g), None)]
    else:
        gg = torch.broadcast_to(g.to(m.device), m.shape)
        groups = [(float(x), gg == x) for x in torch.unique(gg).tolist()]
    out = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
    md = m.to(torch.float64).clamp_min(1e-300)
    for gv, mask in groups:
        if gv <= 0:
            raise ConfigError(f"gain: got {gv!r}, allowed: > 0")
        logm_t, logmi_t = (t.to(m.device) for t in _charge_table(rel_var, threshold / gv))
        lm = torch.log(md).clamp(logm_t[0], logm_t[-1])
        h = logm_t[1] - logm_t[0]
        j = ((lm - logm_t[0]) / h).floor().long().clamp(0, logm_t.numel() - 2)
        frac = (lm - logm_t[j]) / h
        mi = torch.exp(logmi_t[j] * (1.0 - frac) + logmi_t[j + 1] * frac)
        val = mi / md
        big = md > M_HI
        val = torch.where(big, 1.0 / (md * (1.0 + rel_var)) + 0.5 / (md * md), val)
        out = val if mask is None else torch.where(mask, val, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# hit-time information
# ----------------------------------------------------------------------------------------------------------
def gauss_legendre_nodes(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """n-point Gauss-Legendre nodes and weights on [0, 1] (numpy.polynomial.legendre.leggauss)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return torch.as_tensor(0.5 * (x + 1.0), dtype=dtype), torch.as_tensor(0.5 * w, dtype=dtype)


# direct light above this [p.e.] gets the fine core layout of _time_nodes: its first p.e. comes in a peak
# narrower than sigma (about sigma / sqrt(2 ln mu))
SHARP_MU = 3.0


def _time_nodes(
    t_mean: Tensor, sig: Tensor, window: tuple[float, float], tail: float, core: int = 16
) -> tuple[Tensor, Tensor]:
    """Per-row quadrature nodes (R,N) and weights (R,N) [ns] on the readout window: 8 GL nodes on
    [t_lo, c - 10 sigma], ``core`` x 8 on [c -+ 10 sigma], 2 x 8 on [c + 10 sigma, + 10 tau], 8 on the rest
    (segment ends clamped to the window; empty segments get zero weight); N = 8 (core + 4)."""
    t_lo, t_hi = window
    x8, w8 = gauss_legendre_nodes(8, t_mean.dtype)
    x8, w8 = x8.to(t_mean.device), w8.to(t_mean.device)
    a0 = (t_mean - 10.0 * sig).clamp(t_lo, t_hi)
    b0 = (t_mean + 10.0 * sig).clamp(t_lo, t_hi)
    c1 = (b0 + 10.0 * tail).clamp(t_lo, t_hi)
    edges = [torch.full_like(t_mean, t_lo), a0]
    edges += [a0 + (b0 - a0) * (k / core) for k in range(1, core + 1)]
    edges += [b0 + (c1 - b0) * 0.5, c1, torch.full_like(t_mean, t_hi)]
    e = torch.stack(edges, -1)  # (R, S+1)
    lo, width = e[:, :-1], e[:, 1:] - e[:, :-1]
    nodes = (lo[..., None] + width[..., None] * x8).flatten(1)
    weights = (width[..., None] * w8).flatten(1)
    return nodes, weights


def time_information(
    mu: Tensor,
    t_mean: Tensor,
    sigma2: Tensor,
    mu_flat: Tensor,
    window: tuple[float, float],
    *,
    mu_tail: Tensor | None = None,
    tail_tau: float = 20.0,
    first_hit: bool = True,
    below: Tensor | None = None,
    row_chunk: int = 40_000,
) -> tuple[Tensor, Tensor]:
    """Information of one hit time given a hit, G = E_f[s s^T] (R,k,k), and the quadrature norm int f (R,).

    Rows R (flattened PMTs); mu (direct p.e.), t_mean [ns], sigma2 [ns^2] (incl. TTS), mu_flat (R,) and
    optionally mu_tail (R,) and below (R,K) (the threshold's sub-threshold probabilities, or None) as in
    :func:`fitting.likelihood.time_log_density`; the score is taken w.r.t.
    (mu, t_mean, sigma2[, indirect]) with indirect = mu_flat (no tail) or mu_tail -- k = 3 or 4.
    s is from autograd of the likelihood's own time_log_density at each node (per-node leaves);
    the expectation is Gauss-Legendre quadrature over the window (see ``_time_nodes``): 16 x 8 nodes on
    t_mean -+ 10 sigma for rows with mu > SHARP_MU, 8 x 8 for the others (measured against a 2 ps grid with
    SK's TTS and threshold: G within 2e-6 of its largest entry up to 10 p.e. with 8 x 8, but 1e-3-5e-3 at
    100 p.e. and sigma = 2 ns, where 16 x 8 gives 4e-8; ``test_time_information_matches_a_dense_grid``).
    The flat light's window edges are taken sharp here (the likelihood blurs them by the TTS:
    ``time_log_density``, edge_sigma); the blur moves a dark hit's density only within a few TTS of the edges
    (a fraction ~TTS / window of the flat light, 0.3 % for 1.5 ns in 500 ns), far from the direct light that
    informs the fit."""
    tail = tail_tau if mu_tail is not None else 5.0
    ind_key = mu_tail if mu_tail is not None else mu_flat
    n_rows = mu.shape[0]
    k = 4
    g_out = torch.zeros(n_rows, k, k, dtype=mu.dtype, device=mu.device)
    norm_out = torch.zeros(n_rows, dtype=mu.dtype, device=mu.device)
    sharp = mu.detach() > SHARP_MU
    for core, rows_all in ((8, (~sharp).nonzero()[:, 0]), (16, sharp.nonzero()[:, 0])):
        for a in range(0, rows_all.numel(), row_chunk):
            sl = rows_all[a : a + row_chunk]
            sig = torch.sqrt(sigma2[sl])
            t, w = _time_nodes(t_mean[sl].detach(), sig.detach(), window, tail, core)
            n_nodes = t.shape[1]

            lm, lt, ls, li = (
                x[sl].detach()[:, None].expand(-1, n_nodes).clone().requires_grad_()
                for x in (mu, t_mean, sigma2, ind_key)
            )
            bl = None if below is None else below[sl][:, None, :]
            with torch.enable_grad():
                if mu_tail is None:
                    lp = time_log_density(t, lm, lt, ls, li, window, first_hit=first_hit, below=bl)
                else:
                    lp = time_log_density(
                        t,
                        lm,
                        lt,
                        ls,
                        mu_flat[sl].detach()[:, None],
                        window,
                        mu_tail=li,
                        tail_tau=tail_tau,
                        first_hit=first_hit,
                        below=bl,
                    )
                finite = torch.isfinite(lp)
                lp_safe = torch.where(finite, lp, torch.zeros_like(lp))
                grads = torch.autograd.grad(lp_safe.sum(), [lm, lt, ls, li])
            dens = torch.where(finite, torch.exp(lp.detach()), torch.zeros_like(lp)) * w  # (R,N)
            s = torch.stack([torch.where(finite, gr, torch.zeros_like(gr)) for gr in grads], -1)  # (R,N,4)
            g_out[sl] = torch.einsum("rn,rni,rnj->rij", dens, s, s)
            norm_out[sl] = dens.sum(-1)
    return g_out, norm_out


# ----------------------------------------------------------------------------------------------------------
# event Fisher matrix and Cramér–Rao bound
# ----------------------------------------------------------------------------------------------------------
def event_fisher(
    response: Any,
    likelihood: Any,
    params: dict[str, Tensor],
    *,
    param_map: Callable[[Tensor], dict[str, Tensor]] | None = None,
    n_params: int | None = None,
    batch_size: int = 8,
    use_time: bool | None = None,
    mu_min_time: float = 1e-6,
    parts: bool = False,
) -> dict[str, Tensor]:
    """Expected Fisher information F (E,k,k) of the event parameters at ``params`` (the truth), batched.

    response: a :class:`fitting.response.ResponseModel`; likelihood: a :class:`HitLikelihood` (its charge
    model v, threshold, gain, mu_floor; dark p.e. mu_dark; time term window, TTS, first_hit, indirect mode).
    params: event-parameter dict (vertex (E,3) [m], direction (E,3), energy (E,) [MeV], t0 (E,) [ns]); the
    default chart is the reconstruction's local coordinates (``LOCAL_NAMES``, k = 7). For another chart pass
    ``param_map`` (y (E,k) -> event-parameter dict, y = 0 at the evaluation point) and ``n_params`` = k.
    use_time: include hit times (default: when the likelihood has a time term); mu_min_time: PMTs with
    direct light below this many p.e. are left out of the time term (their information is O(mu^2), far below
    the total). Returns F (E,k,k) float64 (plus F_charge and F_time when ``parts``), and e1, e2 (E,3) of the
    default chart."""
    e_all = params["vertex"].shape[0]
    if param_map is not None and n_params is None:
        raise ConfigError("n_params: required with param_map (number of parameters k)")
    batch_size = check_number(batch_size, "batch_size", minimum=1, integer=True)
    ch = likelihood.charge
    tterm = getattr(likelihood, "time", None)
    use_time = (tterm is not None) if use_time is None else bool(use_time)
    if use_time and tterm is None:
        raise ConfigError("use_time: True but the likelihood has no time term")
    res: dict[str, list[Tensor]] = {"F": [], "F_charge": [], "F_time": [], "e1": [], "e2": []}
    dev = params["vertex"].device
    for a in range(0, e_all, batch_size):
        sub = {k: v[a : a + batch_size] for k, v in params.items()}
        ne = sub["vertex"].shape[0]
        if param_map is None:
            fmap, basis = local_param_map(sub)
            k = 7
            res["e1"].append(basis["e1"])
            res["e2"].append(basis["e2"])
        else:
            fmap, k = param_map, int(n_params)
            if a > 0 or ne != e_all:
                raise ConfigError("batch_size: a custom param_map needs all events in one batch")
        y0 = torch.zeros(ne, k, dtype=torch.float64, device=dev)
        vals, jac = response_jacobian(response, fmap, y0)
        mu = vals["mu"].to(torch.float64)
        p = mu.shape[1]
        mu_dark = likelihood.mu_dark.to(device=mu.device, dtype=mu.dtype).expand(ne, p)
        m = mu + mu_dark + ch.mu_floor
        jm = jac["mu"]
        if "mu_indirect" in vals:
            m = m + vals["mu_indirect"]
            jm = jm + jac["mu_indirect"]
        iq = charge_information(m, ch.rel_var, ch.threshold, ch.gain)
        f_charge = torch.einsum("ep,epi,epj->eij", iq, jm, jm)
        f_time = torch.zeros_like(f_charge)
        if use_time:
            gain = ch.gain.to(device=mu.device, dtype=mu.dtype).expand(ne, p)
            p_hit = -torch.expm1(unhit_log_prob(m, ch.rel_var, ch.threshold, gain))
            rows = (mu > mu_min_time).nonzero(as_tuple=True)
            if rows[0].numel():
                floor = tterm.mu_floor
                tts = tterm.tts.detach().to(device=mu.device, dtype=mu.dtype).expand(p)
                sigma2 = vals["t_var"][rows] + tts[rows[1]] ** 2
                mu_ind = vals["mu_indirect"][rows] if "mu_indirect" in vals else torch.zeros_like(sigma2)
                mdk = mu_dark[rows]
                below = tterm.below_rows(rows[1])
                if tterm.indirect == "flat":
                    g, _ = time_information(
                        mu[rows] + floor,
                        vals["t_mean"][rows],
                        sigma2,
                        mu_ind + mdk + floor,
                        tterm.window,
                        first_hit=tterm.first_hit,
                        below=below,
                    )
                else:
                    g, _ = time_information(
                        mu[rows] + floor,
                        vals["t_mean"][rows],
                        sigma2,
                        mdk + floor,
                        tterm.window,
                        mu_tail=mu_ind + floor,
                        tail_tau=tterm.tail_tau,
                        first_hit=tterm.first_hit,
                        below=below,
                    )
                zero = torch.zeros_like(jac["mu"][rows])
                jt = torch.stack(
                    [
                        jac["mu"][rows],
                        jac["t_mean"][rows],
                        jac["t_var"][rows],
                        jac["mu_indirect"][rows] if "mu_indirect" in jac else zero,
                    ],
                    1,
                )  # (R,4,k)
                contrib = p_hit[rows][:, None, None] * torch.einsum("rai,rab,rbj->rij", jt, g, jt)
                f_time = f_time.index_add(0, rows[0], contrib)
        res["F"].append(f_charge + f_time)
        res["F_charge"].append(f_charge)
        res["F_time"].append(f_time)
    out = {"F": torch.cat(res["F"])}
    if parts:
        out["F_charge"] = torch.cat(res["F_charge"])
        out["F_time"] = torch.cat(res["F_time"])
    if res["e1"]:
        out["e1"], out["e2"] = torch.cat(res["e1"]), torch.cat(res["e2"])
    return out


class _Kinked:
    """A response whose ``expected`` is its ``expected_kinked`` (for :func:`response_jacobian`)."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def expected(self, event_params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.response.expected_kinked(event_params)


def hybrid_fisher(
    response: Any,
    likelihood: Any,
    params: dict[str, Tensor],
    *,
    modes: int | None = None,
    kink_sets: int = 0,
    seed: int = 0,
    batch_size: int = 4,
    use_time: bool | None = None,
) -> dict[str, Tensor]:
    """Hybrid Fisher information of the 7 local event parameters with the track's multiple-scattering kinks
    as random nuisance parameters (the hybrid Cramér-Rao bound: Rockah & Schultheiss, IEEE Trans. ASSP 35
    (1987) 286; Van Trees & Bell, Bayesian Bounds for Parameter Estimation, 2007, sec. 1.2).

    The kinks of the K track cells of ``response.ms_kinks`` are expanded in the M leading modes per
    transverse axis of :func:`fitting.uncertainty.kink_modes` (``modes``; None: all K), amplitudes
    z ~ N(0, I) (2M); the data are drawn from the bent track ``response.expected_kinked`` of one kink set,
    its rings smeared by the moments of the kinks outside the modes (``node_ms``, averaged as in the
    smeared track). The information of y = (theta, z) with the prior's -|z|^2/2 is J = E_z[F(theta, z)] +
    diag(0, I), F the expected Fisher information of :func:`event_fisher` for the bent track, and any
    estimator of theta, unbiased for every kink set, has Cov >= (J^-1)_theta = (J_tt - J_tz J_zz^-1 J_zt)^-1.
    It bounds the track fit as the data are (each event one bent track), where the bound of
    :func:`event_fisher` on the smeared straight track assumes Poisson counts about the kink-averaged mean.
    E_z is the mean over ``kink_sets`` seeded draws of z per event (0: F at the unbent track, z = 0, its
    first-order value).

    Node convergence: the bent track's rings are sharp up to the remaining kinks, so its K point emitters
    show up as features the continuous track does not have, and they carry spurious information. In WCTE at
    1 GeV (2 events, kink_sets 0) the sharp track's log E bound is 0.08 % with 32 nodes, 0.3 % with 64,
    0.45 % with 128 (the smeared track's: 0.64 % at all three); with M = 8 modes the rest smears the nodes
    (benchmarks/bench_resolution.py takes a separate response with --bound-nodes for both bounds).

    Events without kinks (``ms_kinks`` None: showers, sources) get the :func:`event_fisher` information.
    Returns float64: F (E,7,7) the effective information of the local chart (``LOCAL_NAMES``) about
    ``params``, J (E,7+2M,7+2M) (absent without kinks), e1, e2 (E,3). Raises ConfigError for modes outside
    1..K."""
    kink_sets = check_number(kink_sets, "kink_sets", minimum=0, integer=True)
    batch_size = check_number(batch_size, "batch_size", minimum=1, integer=True)
    kinks = response.ms_kinks(params)
    if kinks is None:
        return event_fisher(response, likelihood, params, batch_size=batch_size, use_time=use_time)
    e_all, k_nodes = kinks["s"].shape
    m = k_nodes if modes is None else int(modes)
    if not 1 <= m <= k_nodes:
        raise ConfigError(f"modes: got {modes}, allowed: 1 to the number of track nodes ({k_nodes}) or None")
    n_z = 2 * m
    n_par = 7 + n_z
    sets = max(kink_sets, 1)
    dev = params["vertex"].device
    if kink_sets == 0:
        z_all = torch.zeros(e_all, 1, n_z, device=dev, dtype=torch.float64)
    else:
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        z_all = torch.randn(e_all, sets, n_z, generator=gen, device=dev, dtype=torch.float64)
    km = kink_modes(kinks["s"], kinks["var"], m)
    rest = km["rest"] if m < k_nodes else None
    kinked = _Kinked(response)
    f_out, j_out, e1s, e2s = [], [], [], []
    for a in range(0, e_all, batch_size):
        sub = {k: v[a : a + batch_size] for k, v in params.items()}
        ne = sub["vertex"].shape[0]
        rep = {k: v.repeat_interleave(sets, 0) for k, v in sub.items()}
        fmap7, basis = local_param_map(rep)
        turn = km["turn"][a : a + ne].repeat_interleave(sets, 0)
        disp = km["disp"][a : a + ne].repeat_interleave(sets, 0)
        ms = None if rest is None else rest[a : a + ne].repeat_interleave(sets, 0)
        z0 = z_all[a : a + ne].reshape(ne * sets, n_z)

        def fmap(
            y: Tensor, fmap7=fmap7, basis=basis, turn=turn, disp=disp, z0=z0, ms=ms
        ) -> dict[str, Tensor]:
            off = kink_mode_offsets(z0 + y[:, 7:], turn, disp, basis["e1"], basis["e2"])
            p = {**fmap7(y[:, :7]), "node_offset": off}
            if ms is not None:
                p["node_ms"] = ms
            return p

        f = event_fisher(
            kinked,
            likelihood,
            rep,
            param_map=fmap,
            n_params=n_par,
            batch_size=ne * sets,
            use_time=use_time,
        )["F"]
        j = f.view(ne, sets, n_par, n_par).mean(1)
        j[:, 7:, 7:] += torch.eye(n_z, dtype=j.dtype, device=j.device)
        jzz = torch.linalg.cholesky(j[:, 7:, 7:])  # prior makes J_zz >= I: positive definite
        x = torch.cholesky_solve(j[:, 7:, :7], jzz)
        f_out.append(j[:, :7, :7] - j[:, :7, 7:] @ x)
        j_out.append(j)
        e1s.append(basis["e1"][::sets])
        e2s.append(basis["e2"][::sets])
    return {"F": torch.cat(f_out), "J": torch.cat(j_out), "e1": torch.cat(e1s), "e2": torch.cat(e2s)}


def crb_covariance(fisher: Tensor) -> tuple[Tensor, Tensor]:
    """CRB covariance F^-1 (E,k,k) (Cholesky; NaN where F is not positive definite) and a (E,) bool ``ok``.
    The per-parameter bounds are sqrt(diag F^-1) (marginal over the other parameters)."""
    f = 0.5 * (fisher + fisher.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(f)
    ok = info == 0
    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand_as(f)
    cov = torch.cholesky_inverse(torch.where(ok[:, None, None], chol, eye))
    return torch.where(ok[:, None, None], cov, torch.full_like(cov, float("nan"))), ok


def crb_quantiles(
    cov: Tensor, n_samples: int = 4000, seed: int = 0, q: float = 0.68
) -> dict[str, Tensor | float]:
    """68% quantiles of the table's quantities for an estimator with Gaussian errors N(0, cov) in the local
    chart (``LOCAL_NAMES``; cov (E,7,7)), by seeded sampling (no closed form for a general 3-D covariance):

    vertex distance |dv| [m]; direction angle atan(sqrt(a^2 + b^2)) [rad] (the angle between d0 and
    normalise(d0 + a e1 + b e2)); fractional energy error |exp(dlogE) - 1|.
    Returns per-event quantiles (E,) ``vertex``, ``angle``, ``energy``, and the pooled quantiles over all
    events with a finite cov (``*_pooled``: the quantile of the mixture of the per-event Gaussians, i.e. the
    ensemble resolution an efficient estimator would show) as floats. Monte-Carlo error of a quantile
    with S samples: ~ 1/sqrt(S) relative (1.6% at 4000)."""
    n_samples = check_number(n_samples, "n_samples", minimum=10, integer=True)
    gen = torch.Generator(device=cov.device).manual_seed(int(seed))
    ok = torch.isfinite(cov).all(-1).all(-1)
    e, k = cov.shape[0], cov.shape[-1]
    c = torch.where(ok[:, None, None], cov, torch.eye(k, dtype=cov.dtype, device=cov.device).expand_as(cov))
    lo, info = torch.linalg.cholesky_ex(0.5 * (c + c.transpose(-1, -2)))
    ok = ok & (info == 0)
    z = torch.randn(e, n_samples, k, generator=gen, device=cov.device, dtype=cov.dtype)
    x = torch.einsum("eij,esj->esi", lo, z)
    dist = x[..., 0:3].norm(dim=-1)
    ang = torch.atan(x[..., 3:5].norm(dim=-1))
    en = torch.expm1(x[..., 5]).abs()
    out: dict[str, Tensor | float] = {}
    nan = float("nan")
    for name, arr in (("vertex", dist), ("angle", ang), ("energy", en)):
        per = torch.quantile(arr, q, dim=1)
        out[name] = torch.where(ok, per, torch.full_like(per, nan))
        out[name + "_pooled"] = float(torch.quantile(arr[ok].flatten(), q)) if bool(ok.any()) else nan
    out["ok"] = ok
    return out
