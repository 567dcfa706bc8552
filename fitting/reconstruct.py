"""Maximum-likelihood event reconstruction: vertex, direction, energy, t0 per event, batched (design §5).

The loop sees only a :class:`fitting.response.ResponseModel` (``expected(params) -> mu, t_mean, t_var``) and
a likelihood module (``likelihood(pred, obs) -> (E,)`` per-event NLL, e.g. :class:`HitLikelihood`).

Parameters per event (units m, ns, MeV): vertex v (3) [m], direction, log kinetic energy, t0 [ns]. Events
are independent, so one batched evaluation gives every event's NLL and gradient. Optimisers:

* ``'bfgs'`` (default, ``_optimise_bfgs``): BFGS per event in local coordinates (dv, two tangent angles of
  the direction, dlogE, dt0) scaled by s = (0.1 m, 0.1 m, 0.1 m, 0.05, 0.05, 0.05, 0.5 ns), its inverse-
  Hessian estimate started from the Fisher matrix at the start point, with its own Armijo line search;
  converged events leave the batch.
* ``'lbfgs'``: torch L-BFGS (strong-Wolfe line search) on the summed NLL over x / s with the direction as an
  unnormalised 3-vector (the NLL is flat along its length); the batch shares one line search, so every
  event is evaluated until the slowest has converged.
* ``'lm'``: Fisher scoring with Levenberg-Marquardt damping (``_optimise_lm``), per event, from the exact
  gradient and the Fisher matrix J^T I J of one forward-mode Jacobian J of the per-PMT predictions
  (tracks only: the shower profile's incomplete gamma function has no forward-mode derivative in torch).
* ``'adam'``: for comparison.

Measured on contained 500 MeV muons, direct light (benchmarks/bench_reconstruct.py, 2 threads): BFGS and
L-BFGS reach the same minimum after the Newton polish (NLL equal to 1e-5); batched value+gradient
evaluations WCTE 16 (BFGS, plus one forward pass of 7 copies for the Fisher start) vs 49 (L-BFGS) for
8 events, SK 45 vs 48 for 4 events; 0.84 vs 1.42 s/event (WCTE) and 4.5 vs 7.5 s/event (SK), float32 fits
with their float32 Hessian, 2026-11-23 (benchmarks/results/reconstruct_cpu_bfgs_minuit8.json); LM needs
10-12 Jacobians of ~3.5 evaluations each (benchmarks/results/reconstruct_cpu_2threads.json).

Uncertainties: covariance = inverse Hessian of the per-event NLL (the observed Fisher information; Cramer-
Rao, e.g. James, Statistical Methods in Experimental Physics, 2006, ch. 7) in the local coordinates
(v (3), two tangent angles a, b of the direction d = normalise(d0 + a e1 + b e2), log E, t0), computed by
batched double back-propagation (7 reverse passes for all events at once), in the fit's dtype, and inverted
in float64 (a float32 Hessian halves its cost; its sigmas agree with the float64 Hessian's to 0.3 % in SK,
0.2 % in WCTE and its gradient to 1e-4 sigma: tests/test_reconstruct.py). After the optimiser, up to
``newton_steps`` Newton steps x <- x - H^-1 g (accepted only when the float64 NLL decreases) polish the
minimum; convergence is declared when the Newton decrement g^T H^-1 g < ``tol_decrement`` (the predicted
remaining NLL decrease is half of it; Boyd & Vandenberghe, Convex Optimization, 2004, 9.5.1).
For a response with multiple-scattering kinks (``response.ms_kinks``, muons and pions), the first of these
Hessians also gives the mixed derivatives with respect to per-node offsets of the track, and the reported
covariance adds the fit's linear response to the kinks (:func:`fitting.uncertainty.kink_response_covariance`;
``cov_hessian`` keeps H^-1 alone). Where the observed Hessian is not positive definite at the end, or the
response says it is not meaningful (``response.hessian_reliable`` False: EM cascades, whose NLL is only
once differentiable on small scales), the polish is Fisher scoring and the covariance the inverse expected
information (``_fisher_polish``; status bit ``fisher_cov``, and ``cov_hessian`` holds F^-1).

Status bits (``status`` (E,) int): see ``STATUS``; ``ok = converged and no failure bit``.
``particle`` may be a track (mu, pi) or an EM shower (e-, e+, gamma); particle identification (e vs mu by
the likelihood ratio of fits under both hypotheses) is :func:`fitting.pid.identify`.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from physics.config import ConfigError, check_choice, check_number

from .fisher import crb_covariance, event_fisher
from .likelihood import hits_to_dense
from .prefit import prefit
from .response import FROZEN_ROW, indirect_template
from .uncertainty import kink_mode_offsets, kink_modes, kink_response_covariance, tangent_basis

__all__ = ["STATUS", "reconstruct", "status_names", "add_reconstruct_parser", "resolutions"]

STATUS = {
    "converged": 1,
    "nonfinite": 2,  # NLL or gradient not finite at the end
    "outside": 4,  # fitted vertex outside the detector
    "max_iter": 8,  # optimiser hit its iteration cap without meeting the convergence criterion
    "no_hits": 16,  # fewer than min_hits hit PMTs: not fitted
    "bad_input": 32,  # NaN/inf charge or time in the event's hits: not fitted
    "seed_outside": 64,  # a user seed vertex was outside the detector: replaced by the pre-fit seed
    "hessian_not_pd": 128,  # neither the Hessian nor the Fisher matrix positive definite: no uncertainties
    "fisher_cov": 256,  # Fisher-scoring polish and covariance (observed Hessian not PD or not meaningful)
    # a stopping track whose fitted range ends within 2 sigma(E) of the wall or beyond it: its energy is a
    # lower limit, and sigma(log E) is not a two-sided error (END_AT_WALL_SIGMA). Not a failure bit: the
    # vertex and direction are fitted, though along the track they move with the energy
    "end_at_wall": 512,
    # kink_modes > 0: the reported fit is the bent track's (``_bent_stage``); a tracked event without it kept
    # its straight fit (the bent minimum's Hessian not positive definite, a non-finite value, or its vertex
    # outside). Not a failure bit
    "bent": 1024,
}
FAILED = STATUS["nonfinite"] | STATUS["outside"] | STATUS["no_hits"] | STATUS["bad_input"]
SCALE = (0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.5)
TRACK_OK = ("mu-", "mu+", "pi-", "pi+")
FIT_OK = TRACK_OK + ("e-", "e+", "gamma")  # tracks and EM showers (PhysicsResponse supports both)
OPTIMISERS = ("bfgs", "lbfgs", "lm", "adam")


def status_names(code: int) -> list[str]:
    """Names of the bits set in a status code."""
    return [k for k, b in STATUS.items() if int(code) & b]


# ----------------------------------------------------------------------------------------------------------
# parameter maps
# ----------------------------------------------------------------------------------------------------------
def _unpack(x: Tensor) -> dict[str, Tensor]:
    """(N,8) physical parameters -> event-parameter dict (vertex, direction (unnormalised), energy, t0)."""
    return {"vertex": x[:, 0:3], "direction": x[:, 3:6], "energy": torch.exp(x[:, 6]), "t0": x[:, 7]}


def _local_to_params(y: Tensor, base: dict[str, Tensor]) -> dict[str, Tensor]:
    """Local coordinates y (N,7) = (dv (3), a, b, dlogE, dt0) about ``base`` -> event parameters."""
    d = base["d"] + y[:, 3:4] * base["e1"] + y[:, 4:5] * base["e2"]
    p = {
        "vertex": base["v"] + y[:, 0:3],
        "direction": d / d.norm(dim=-1, keepdim=True),
        "energy": torch.exp(base["loge"] + y[:, 5]),
        "t0": base["t0"] + y[:, 6],
    }
    if "row" in base:  # the rows' frozen indirect light (fitting.response.FROZEN_ROW)
        p[FROZEN_ROW] = base["row"]
    return p


def _select_obs(obs: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v.index_select(0, idx) for k, v in obs.items()}


# ----------------------------------------------------------------------------------------------------------
# core
# ----------------------------------------------------------------------------------------------------------
def _nll_fn(response, likelihood, obs: dict[str, Tensor]):
    def f(params: dict[str, Tensor]) -> Tensor:
        return likelihood(response.expected(params), obs)

    return f


def _local_nll(response, likelihood, obs: dict[str, Tensor], base: dict[str, Tensor], dtype: torch.dtype):
    """f(y, off=None) -> per-event NLL (N,) at local coordinates y (N,7) about ``base``
    (``_local_to_params``), with optional track-node offsets off (N,K,6), evaluated in ``dtype`` (obs and
    base cast to it; y and off too, so the derivatives come back in y's dtype)."""
    obs_d = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in obs.items()}
    f = _nll_fn(response, likelihood, obs_d)
    b = _cast_base(base, dtype)

    def floc(y: Tensor, off: Tensor | None = None) -> Tensor:
        p = _local_to_params(y.to(dtype), b)
        return f(p if off is None else {**p, "node_offset": off.to(dtype)})

    return floc


def _hessian(f, y: Tensor, off: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-event NLL (N,), gradient (N,n) and Hessian (N,n,n) at coordinates y (N,n) (the local ones: n = 7;
    the bent stage's: 7 + 2M), batched; with ``off`` (N,K,6) (track-node offsets, f(y, off)) also the mixed
    derivatives d^2 NLL / dy d off (N,n,K,6) from the same n reverse passes."""
    y = y.detach().requires_grad_()
    ins = [y] if off is None else [y, off.detach().requires_grad_()]
    nll = f(*ins)
    (g,) = torch.autograd.grad(nll.sum(), y, create_graph=True)
    rows, mixed = [], []
    for j in range(y.shape[1]):
        out = torch.autograd.grad(g[:, j].sum(), ins, retain_graph=j < y.shape[1] - 1)
        rows.append(out[0])
        if off is not None:
            mixed.append(out[1])
    hess = torch.stack(rows, 1)
    mix = torch.stack(mixed, 1).detach() if off is not None else None
    return nll.detach(), g.detach(), 0.5 * (hess + hess.transpose(1, 2)).detach(), mix


def _newton_step(f, y: Tensor, nll: Tensor, g: Tensor, hinv: Tensor, pd: Tensor) -> tuple[Tensor, Tensor]:
    """One Newton step y - H^-1 g per event where H is positive definite (pd) and the step finite, accepted
    only where the NLL f(y) (N,) decreases (one forward pass); returns the new (y, nll)."""
    step = -(hinv @ g[..., None])[..., 0]
    todo = pd & torch.isfinite(step).all(-1)
    y_try = torch.where(todo[:, None], y + step, y)
    with torch.no_grad():
        nll_try = f(y_try)
    acc = todo & torch.isfinite(nll_try) & (nll_try < nll)
    return torch.where(acc[:, None], y_try, y), torch.where(acc, nll_try, nll)


def _scaled_value_grad(f, sc: Tensor, dtype: torch.dtype):
    """value_grad(z, idx) for :func:`_bfgs_loop`: f(y (M,n) in ``dtype``, idx (M,)) -> NLL (M,) at y = z sc,
    returned with its gradient in z, both float64."""

    def value_grad(z: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        y = (z * sc).to(dtype).requires_grad_()
        val = f(y, idx)
        (g,) = torch.autograd.grad(val.sum(), y)
        return val.detach().to(sc.dtype), g.to(sc.dtype) * sc

    return value_grad


def _optimise(
    f, x0: Tensor, optimiser: str, max_iter: int, lr: float, trace: list[float] | None
) -> tuple[Tensor, int]:
    """Minimise sum f(x) over x (N,8) (physical units) on scaled variables; returns (x, iterations)."""
    scale = torch.tensor(SCALE, dtype=x0.dtype, device=x0.device)
    z = (x0 / scale).detach().clone().requires_grad_()
    n_eval = 0

    def total() -> Tensor:
        nonlocal n_eval
        n_eval += 1
        val = f(z * scale).sum()
        if trace is not None:
            trace.append(float(val.detach()) / x0.shape[0])
        return val

    if optimiser == "lbfgs":
        opt = torch.optim.LBFGS(
            [z],
            lr=1.0,
            max_iter=max_iter,
            max_eval=int(max_iter * 1.5),
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            val = total()
            val.backward()
            return val

        opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    else:
        opt = torch.optim.Adam([z], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_iter, eta_min=lr * 0.02)
        for _ in range(max_iter):
            opt.zero_grad()
            total().backward()
            opt.step()
            sched.step()
        n_iter = max_iter
    return (z * scale).detach(), n_iter


# ----------------------------------------------------------------------------------------------------------
# Fisher-scoring Levenberg-Marquardt (optimiser='lm')
# ----------------------------------------------------------------------------------------------------------
LM_MAX_STEP = 30.0  # trust-region cap on the scaled step norm per iteration (units of SCALE)
LM_MAX_DOUBLINGS = 4  # extrapolation of a step that gained more than predicted: up to 2^4 x
LM_TOL = 0.05  # [NLL units] stop an event's scoring iterations once a step gains less (then Newton polish)
_PRED_KEYS = ("mu", "t_mean", "t_var", "mu_indirect")


def _base_from_x(x: Tensor, row: Tensor | None = None) -> dict[str, Tensor]:
    """(N,8) physical parameters -> expansion point of the local coordinates (see ``_local_to_params``).
    row (N,) long: each row's index in the parameters the response's indirect light was frozen at
    (default 0..N-1: the reconstruction freezes at the x it then expands about); subsets and copies of base
    (active events, finite-difference copies) carry it along; a re-centred subset passes its own."""
    d = x[:, 3:6] / x[:, 3:6].norm(dim=-1, keepdim=True)
    base = {"v": x[:, 0:3], "d": d, "loge": x[:, 6], "t0": x[:, 7]}
    base["e1"], base["e2"] = tangent_basis(d)
    base["row"] = torch.arange(x.shape[0], device=x.device) if row is None else row
    return base


def _cast_base(base: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """base with its floating entries in ``dtype`` (the row indices stay integer)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base.items()}


def _x_from_local(y: Tensor, base: dict[str, Tensor]) -> Tensor:
    p = _local_to_params(y, base)
    return torch.cat([p["vertex"], p["direction"], torch.log(p["energy"])[:, None], p["t0"][:, None]], 1)


def _pmt_information(likelihood, pred: dict[str, Tensor], obs: dict[str, Tensor]) -> Tensor:
    """Per-PMT information matrix (N,P,C,C) of the likelihood in the prediction channels (``_PRED_KEYS``).

    For :class:`fitting.likelihood.HitLikelihood` the expected (Fisher) information of the two terms:
    Poisson count with mean m = mu + mu_indirect + mu_dark, I = 1/m on every pair of the additive channels
    (Fisher scoring; e.g. James 2006, sec. 7.2; 1/(m + w mu^2) for the negative binomial of
    obs['mu_rel_var'] = w, whose variance is m + w mu^2); hit time ~ N(t_mean, t_var + TTS^2) for the direct
    fraction f = mu / m of the light, I_tt = f / s^2, I_vv = f / (2 s^4) (Gaussian Fisher information). For
    another likelihood module: the positive part of the observed per-PMT curvature (generalised Gauss-Newton;
    Schraudolph, Neural Comput. 14 (2002) 1723)."""
    keys = [k for k in _PRED_KEYS if k in pred]
    mu = pred["mu"]
    n_ch = len(keys)
    info = torch.zeros(*mu.shape, n_ch, n_ch, dtype=mu.dtype, device=mu.device)
    if hasattr(likelihood, "mu_dark") and hasattr(likelihood, "charge"):
        m = mu + likelihood.mu_dark.to(mu) + 1e-8
        if "mu_indirect" in pred:
            m = m + pred["mu_indirect"]
        var = m if "mu_rel_var" not in obs else m + obs["mu_rel_var"].to(m) * mu * mu
        add = [i for i, k in enumerate(keys) if k in ("mu", "mu_indirect")]
        for i in add:
            for j in add:
                info[..., i, j] = 1.0 / var
        tterm = getattr(likelihood, "time", None)
        if tterm is not None:
            s2 = pred["t_var"] + tterm.tts.to(mu).expand(mu.shape[-1]) ** 2
            f = torch.where(obs["hit"], mu / m, torch.zeros_like(mu))
            info[..., 1, 1] = f / s2
            info[..., 2, 2] = f / (2.0 * s2 * s2)
        return info
    ch = [pred[k].detach().requires_grad_() for k in keys]
    ell = likelihood.per_pmt(dict(zip(keys, ch, strict=True)), obs)
    grads = torch.autograd.grad(ell.sum(), ch, create_graph=True)
    rows = []
    for c, gc in enumerate(grads):
        hc = torch.autograd.grad(gc.sum(), ch, retain_graph=c < n_ch - 1, allow_unused=True)
        rows.append(torch.stack([h if h is not None else torch.zeros_like(gc) for h in hc], -1))
    h = torch.stack(rows, -2).detach()
    ev, evec = torch.linalg.eigh(0.5 * (h + h.transpose(-1, -2)))
    return (evec * ev.clamp_min(0.0)[..., None, :]) @ evec.transpose(-1, -2)


def _with_t0_column(jac6: Tensor, keys: list[str], unit: float | Tensor = 1.0) -> Tensor:
    """Append the t0 column to a (6,N,P,C) prediction Jacobian over (v, a, b, log E): exact by time-
    translation invariance (the model depends on t0 only through t_mean = t0 + ...), d t_mean / d t0 =
    ``unit`` (the t0 scale of the coordinates), every other channel 0. Returns (7,N,P,C)."""
    jt0 = torch.zeros_like(jac6[0])
    jt0[..., keys.index("t_mean")] = unit
    return torch.cat([jac6, jt0[None]], 0)


def _scoring_system(response, likelihood, obs, base, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """NLL (N,), exact gradient (N,7) and Fisher matrix (N,7,7) in local coordinates y = 0 about ``base``.

    One forward-mode pass gives the predictions eta (N,P,C) and their Jacobian J = d eta / dy (6 tangents
    batched with torch.func.vmap over torch.func.jvp; the t0 column is exact); then g = J^T dl/deta (one
    reverse pass through the per-PMT likelihood only, not through the response) and F = J^T I J with I from
    ``_pmt_information``."""
    n = base["v"].shape[0]
    y0 = torch.zeros(n, 7, dtype=dtype, device=base["v"].device)
    keys: list[str] = []

    def eta(y: Tensor) -> Tensor:
        o = response.expected(_local_to_params(y, base))
        keys[:] = [k for k in _PRED_KEYS if k in o]
        return torch.stack([o[k] for k in keys], -1)  # (N,P,C)

    # tangents of v (3), a, b, log E; the t0 column is exact (``_with_t0_column``)
    tang = torch.eye(7, dtype=dtype, device=y0.device)[:6, None, :].expand(6, n, 7)
    with torch.no_grad():  # forward mode only: no reverse graph through the response's parameters
        val, jac = torch.func.vmap(lambda t: torch.func.jvp(eta, (y0,), (t,)), out_dims=(None, 0))(tang)
        jac = _with_t0_column(jac, keys)  # (7,N,P,C)
    ch = [val[..., c].detach().requires_grad_() for c in range(val.shape[-1])]
    pred = dict(zip(keys, ch, strict=True))
    ell = likelihood.per_pmt(pred, obs)  # (N,P)
    g_eta = torch.stack(torch.autograd.grad(ell.sum(), ch), -1).double()  # (N,P,C)
    with torch.no_grad():
        info = _pmt_information(likelihood, {k: v.detach() for k, v in pred.items()}, obs).double()
    jd = jac.double()
    grad = torch.einsum("jnpc,npc->nj", jd, g_eta)
    fisher = torch.einsum("inpc,npcd,jnpd->nij", jd, info, jd)
    return ell.detach().sum(-1).double(), grad, fisher


def _optimise_lm(
    response, likelihood, obs, x0: Tensor, max_iter: int, tol: float, trace: list[float] | None
) -> tuple[Tensor, int]:
    """Fisher scoring with Levenberg-Marquardt damping, per event (Marquardt, J. SIAM 11 (1963) 431).

    Each iteration solves (F + lambda diag F) dz = -g in the scaled local coordinates z = y / SCALE (F the
    Fisher matrix, g the exact gradient, ``_scoring_system``), caps |dz| at LM_MAX_STEP, and accepts the
    step when the NLL does not increase (lambda /= 5), else retries with lambda *= 10 (forward evaluations
    only). An event stops when an accepted step lowers the NLL by less than ``tol`` (or the predicted
    decrease is below it); the exact-Hessian Newton polish in ``_fit_batch`` then finishes the tail.
    Converged events leave the batch. Returns (x (N,8), iterations of the slowest event)."""
    dtype, dev, n = x0.dtype, x0.device, x0.shape[0]
    sc = torch.tensor(SCALE[:3] + SCALE[4:], dtype=torch.float64, device=dev)  # local: v, a, b, logE, t0
    x = x0.clone()
    lam = torch.full((n,), 1e-3, dtype=torch.float64, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    nll_cur = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
    eye = torch.eye(7, dtype=torch.float64, device=dev)
    n_iter = 0
    for _ in range(max_iter):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        n_iter += 1
        ob = _select_obs(obs, idx)
        base = _base_from_x(x[idx], idx)  # the rows of the frozen set (x0)
        nll0, g, fis = _scoring_system(response, likelihood, ob, base, dtype)
        nll_cur[idx] = nll0
        if trace is not None:
            trace.append(float(nll_cur.mean()))
        gs = g * sc
        fs = fis * sc[:, None] * sc[None, :]
        diag = torch.diagonal(fs, dim1=1, dim2=2).clamp_min(1e-6)
        done = ~torch.isfinite(nll0) | ~torch.isfinite(gs).all(-1)
        conv = done.clone()
        lm = lam[idx]
        for _retry in range(6):
            a = fs + lm[:, None, None] * torch.diag_embed(diag) + 1e-9 * eye
            chol, info = torch.linalg.cholesky_ex(a)
            step = -torch.cholesky_solve(gs[..., None], chol)[..., 0]
            step = torch.where((info == 0)[:, None], step, -gs / diag)
            step = step * (LM_MAX_STEP / step.norm(dim=-1, keepdim=True).clamp_min(LM_MAX_STEP))
            pred_dec = -(gs * step).sum(-1) - 0.5 * (step[:, None, :] @ fs @ step[..., None])[:, 0, 0]
            sub = (~done).nonzero()[:, 0]
            if sub.numel() == 0:
                break
            y = (step[sub] * sc).to(dtype)
            bsub = {k: v[sub] for k, v in base.items()}
            with torch.no_grad():
                pred_t = response.expected(_local_to_params(y, bsub))
                nll_t = likelihood(pred_t, _select_obs(ob, sub)).double()
            ok = torch.isfinite(nll_t) & (nll_t <= nll0[sub])
            acc, rej = sub[ok], sub[~ok]
            x[idx[acc]] = _x_from_local(y[ok], {k: v[ok] for k, v in bsub.items()}).to(x.dtype)
            conv[acc] = ((nll0[acc] - nll_t[ok]) < tol) | (pred_dec[acc] < tol)
            # the model under-predicted the gain (far from the minimum the Fisher matrix over-estimates the
            # curvature): extrapolate along the accepted step, doubling it while the NLL keeps falling
            # (forward evaluations only)
            grow = ok & ~conv[sub] & ((nll0[sub] - nll_t) > 0.75 * pred_dec[sub])
            best_nll, best_y = nll_t.clone(), y.clone()
            for _double in range(LM_MAX_DOUBLINGS):
                gi = grow.nonzero()[:, 0]
                if gi.numel() == 0:
                    break
                y2 = 2.0 * best_y[gi]
                b2 = {k: v[gi] for k, v in bsub.items()}
                with torch.no_grad():
                    nll2 = likelihood(
                        response.expected(_local_to_params(y2, b2)), _select_obs(ob, sub[gi])
                    ).double()
                better = torch.isfinite(nll2) & (nll2 < best_nll[gi])
                best_nll[gi[better]] = nll2[better]
                best_y[gi[better]] = y2[better]
                grow[gi[~better]] = False
            x[idx[acc]] = _x_from_local(best_y[ok], {k: v[ok] for k, v in bsub.items()}).to(x.dtype)
            lm[acc] = (lm[acc] / 5.0).clamp_min(1e-7)
            lm[rej] = lm[rej] * 10.0
            conv[rej] |= pred_dec[rej] < tol  # nothing left to gain within the model: at the minimum
            done[acc] = True
            done[rej] |= conv[rej]
            if bool(done.all()):
                break
        lam[idx] = lm
        active[idx[conv]] = False
    return x.detach(), n_iter if bool(active.any()) else min(n_iter, max_iter - 1)


# ----------------------------------------------------------------------------------------------------------
# per-event BFGS started from the Fisher matrix (default optimiser)
# ----------------------------------------------------------------------------------------------------------
BFGS_TOL = 0.01  # [NLL units] stop an event when the predicted decrease g^T H g / 2 is below this
# a stopping track whose fitted energy exceeds this factor times the energy whose range ends at the wall
# (response.contained_energy) is refitted from the wall-limited energy / this factor (_fit_batch)
WALL_RESTART = 1.02
# status end_at_wall: the fitted energy is above the wall-limited one times exp(-this x sigma(log E))
END_AT_WALL_SIGMA = 2.0
BFGS_REBASE = 0.5  # re-centre the local coordinates once the direction has turned by atan(0.5) = 27 deg
_ARMIJO_C1 = 1e-4


def _fisher_fd(response, likelihood, obs, base, dtype, sc: Tensor, h: float = 0.1) -> Tensor:
    """Fisher matrix (N,7,7) in the scaled local coordinates z = y / sc at z = 0, J^T I J with the Jacobian J
    of the per-PMT predictions from forward differences of step ``h`` (one batched forward pass of 7 N
    events, no autograd: works for any response, also one with operations that lack forward-mode AD, e.g.
    the shower profile's incomplete gamma function) and I from ``_pmt_information``. Used only to start the
    BFGS inverse-Hessian estimate, so the O(h) difference error does not matter."""
    n, dev = base["v"].shape[0], base["v"].device
    y = torch.zeros(7, n, 7, dtype=dtype, device=dev)
    y[torch.arange(1, 7), :, torch.arange(6)] = (h * sc[:6]).to(dtype)[:, None]  # copies 1-6: v, a, b, log E
    rep = {k: v.repeat(7, *([1] * (v.dim() - 1))) for k, v in base.items()}
    with torch.no_grad():
        out = response.expected(_local_to_params(y.reshape(7 * n, 7), rep))
        keys = [k for k in _PRED_KEYS if k in out]
        eta = torch.stack([out[k] for k in keys], -1).reshape(7, n, *out["mu"].shape[1:], len(keys)).double()
        jac = _with_t0_column((eta[1:] - eta[:1]) / h, keys, sc[6])  # (7,N,P,C)
        info = _pmt_information(likelihood, {k: out[k][:n].detach() for k in keys}, obs).double()
    return torch.einsum("inpc,npcd,jnpd->nij", jac, info, jac)


def _fisher_polish(
    response, likelihood, f64, x: Tensor, steps: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fisher-scoring polish for events whose observed Hessian is not positive definite at the optimiser's
    point x (N,8) (float64): each step re-centres the local coordinates at the current point, takes the
    float64 NLL gradient g (``f64``: params -> (N,) NLL) and the expected information F of the hit
    likelihood (:func:`fitting.fisher.event_fisher`: exact charge and first-hit-time information, the same
    chart; Poisson counts, without a negative binomial's over-dispersion), and moves y <- -F^-1 g (or 1/2,
    1/4 of it) when the NLL decreases; converged when g^T F^-1 g < ``tol``.
    Returns x (N,8), NLL (N,), covariance F^-1 (N,7,7) in the local coordinates about x, converged, F
    positive definite (N,) bool.

    Why: the observed Hessian is the curvature at a point, and an NLL that is only once differentiable on a
    small scale has a meaningless one there. The EM-cascade light is such a case: the Raedel-Wiebusch angular
    density A exp(B |cos - 1/n|^C) + D (C < 1) has a cusp at the Cherenkov angle, so its cell-and-photocathode
    average (``physics.expected.shower_direct_light``) has a continuous first derivative but unbounded second
    derivatives wherever an averaging edge crosses the cusp; measured on 10 WCTE 500 MeV electrons: the
    float64 Hessian had eigenvalues down to -9.5e4 at the fit and finite differences along that direction
    gave +4e4 at 1 cm but -2e4 at 0.1 mm. The Fisher matrix (expected information, J^T I J) takes only
    first derivatives, and its inverse is the Cramer-Rao covariance (James 2006, ch. 7)."""
    n = x.shape[0]
    nll = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    cov = torch.full((n, 7, 7), float("nan"), dtype=torch.float64, device=x.device)
    converged = torch.zeros(n, dtype=torch.bool, device=x.device)
    pd = torch.zeros(n, dtype=torch.bool, device=x.device)
    for it in range(steps + 1):
        base = _base_from_x(x)
        y = torch.zeros(n, 7, dtype=torch.float64, device=x.device, requires_grad=True)
        val = f64(_local_to_params(y, base))
        (g,) = torch.autograd.grad(val.sum(), y)
        nll = val.detach()
        fy = event_fisher(response, likelihood, _unpack(x), batch_size=n)["F"]
        cov, pd = crb_covariance(fy)
        pd = pd & torch.isfinite(fy).all(-1).all(-1)
        step = -(cov @ g[..., None])[..., 0]
        converged = pd & ((g * -step).sum(-1) < tol)
        if it == steps or bool(converged.all()):
            break
        todo = pd & ~converged & torch.isfinite(step).all(-1)
        acc = torch.zeros_like(todo)
        for frac in (1.0, 0.5, 0.25):  # backtracking: the NLL is rough on small scales
            with torch.no_grad():
                x_try = _x_from_local(torch.where(todo[:, None], frac * step, torch.zeros_like(step)), base)
                # a near-singular F can give a step whose energy overflows: such rows stay where they are
                fin = torch.isfinite(x_try).all(-1)
                x_try = torch.where(fin[:, None], x_try, x)
                nll_try = f64(_unpack(x_try))
            ok = todo & fin & ~acc & torch.isfinite(nll_try) & (nll_try < nll)
            x = torch.where(ok[:, None], x_try, x)
            acc = acc | ok
            if bool((acc | ~todo).all()):
                break
        if not bool(acc.any()):
            break
    return x, nll, cov, converged, pd


def _bfgs_loop(
    value_grad,
    z: Tensor,
    hz: Tensor,
    max_iter: int,
    tol: float,
    trace: list[float] | None = None,
    rebase=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The batched BFGS iteration of :func:`_optimise_bfgs` on any number of scaled variables z (N,n): a
    separate Armijo line search per event with quadratic-interpolation backtracking, the BFGS update of the
    inverse-Hessian estimates hz (N,n,n) (skipped when s.y <= 0), steps capped at LM_MAX_STEP; an event
    stops when the predicted decrease g^T H g / 2 < ``tol``, an accepted step gains < tol / 10, or after
    ``max_iter`` accepted steps. value_grad(z (M,n), idx (M,)) -> (value (M,), gradient (M,n)) float64 for
    the events idx; rebase(z, idx) -> the events among idx whose coordinates it re-centred (z set to 0 there,
    value and gradient recomputed). Returns (z, accepted steps per event (N,), hz)."""
    f64, dev, n = torch.float64, z.device, z.shape[0]
    eye = torch.eye(z.shape[1], dtype=f64, device=dev)

    def record() -> None:
        if trace is not None:
            trace.append(float(fval.mean()))

    every = torch.arange(n, device=dev)
    fval, gz = value_grad(z, every)
    record()
    p = torch.zeros_like(z)
    alpha = torch.ones(n, dtype=f64, device=dev)
    new_dir = torch.ones(n, dtype=torch.bool, device=dev)
    active = torch.isfinite(fval) & torch.isfinite(gz).all(-1)
    iters = torch.zeros(n, dtype=torch.long, device=dev)
    for _ in range(4 * max_iter):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        nd = idx[new_dir[idx]]
        far = rebase(z, nd) if rebase is not None and nd.numel() else nd[:0]
        if far.numel():
            z[far] = 0.0
            fval[far], gz[far] = value_grad(z[far], far)
            record()
        if nd.numel():
            step = -(hz[nd] @ gz[nd, :, None])[..., 0]
            uphill = ~((step * gz[nd]).sum(-1) < 0)  # H lost positive definiteness: steepest descent, reset
            step[uphill] = -gz[nd][uphill]
            hz[nd[uphill]] = eye
            p[nd] = step * (LM_MAX_STEP / step.norm(dim=-1, keepdim=True).clamp_min(LM_MAX_STEP))
            alpha[nd] = 1.0
            new_dir[nd] = False
        zt = z[idx] + alpha[idx, None] * p[idx]
        ft, gt = value_grad(zt, idx)
        slope = (gz[idx] * p[idx]).sum(-1)
        armijo = ft <= fval[idx] + _ARMIJO_C1 * alpha[idx] * slope
        ok = torch.isfinite(ft) & torch.isfinite(gt).all(-1) & armijo
        acc, rej = idx[ok], idx[~ok]
        if acc.numel():
            s, yv = zt[ok] - z[acc], gt[ok] - gz[acc]
            sy = (s * yv).sum(-1)
            rho = torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
            v = eye - rho[:, None, None] * s[:, :, None] * yv[:, None, :]
            hz[acc] = v @ hz[acc] @ v.transpose(1, 2) + rho[:, None, None] * s[:, :, None] * s[:, None, :]
            gain = fval[acc] - ft[ok]
            z[acc], fval[acc], gz[acc] = zt[ok], ft[ok], gt[ok]
            iters[acc] += 1
            pred = 0.5 * (gz[acc, None, :] @ hz[acc] @ gz[acc, :, None])[:, 0, 0]
            active[acc[(pred < tol) | (gain < 0.1 * tol) | (iters[acc] >= max_iter)]] = False
            new_dir[acc] = True
        if rej.numel():  # backtrack to the minimiser of the quadratic through f(0), f'(0), f(alpha),
            # clamped to [0.1, 0.5] alpha
            a, fr, sl = alpha[rej], ft[~ok], slope[~ok]
            curv = 2.0 * (fr - fval[rej] - sl * a)
            quad = -sl * a * a / curv.clamp_min(1e-300)
            a_new = torch.where(torch.isfinite(fr) & (curv > 0), quad, 0.5 * a)
            alpha[rej] = torch.minimum(torch.maximum(a_new, 0.1 * a), 0.5 * a)
            active[rej[alpha[rej] < 1e-6]] = False  # no decrease along a descent direction: at the minimum
        record()
    return z, iters, hz


def _optimise_bfgs(
    response,
    likelihood,
    obs,
    x0: Tensor,
    max_iter: int,
    tol: float,
    trace: list[float] | None,
    h0: Tensor | None = None,
) -> tuple[Tensor, int, Tensor]:
    """Batched BFGS with a separate line search per event (Nocedal & Wright, Numerical Optimization, 2nd ed.
    2006, Alg. 6.1 with the Armijo condition, sec. 3.1, and quadratic-interpolation backtracking, sec. 3.5).

    Variables: the scaled local coordinates z = y / SCALE about each start (``_local_to_params``). The
    inverse-Hessian estimate starts from the regularised Fisher matrix at the start, (F + 0.1 diag F +
    1e-3)^-1 (``_fisher_fd``: one batched forward pass of 7 copies of the batch), so the
    first steps are already scaled and correlated like Fisher-scoring steps; BFGS then learns the observed
    curvature. Each batched value+gradient call evaluates every still-active event at its own trial point;
    an event accepts its step when the Armijo condition holds (then the BFGS update, skipped when
    s.y <= 0), else shrinks it; it stops when the predicted decrease g^T H g / 2 < ``tol`` or an accepted
    step gains < tol / 10, and leaves the batch. A direction that has turned by more than atan(BFGS_REBASE)
    from its expansion point is re-centred (one extra evaluation), so fits can turn the direction by any
    angle. Steps are capped at LM_MAX_STEP in scaled units. ``h0`` (N,7,7): the inverse-Hessian estimate to
    start from instead (e.g. a previous run's, for a continuation on a nearby likelihood; no Fisher pass).
    Returns (x (N,8), accepted iterations of the slowest event, ``max_iter`` when an event hit the cap; the
    final inverse-Hessian estimates (N,7,7) in scaled units). ``trace`` gets the mean NLL after each batched
    evaluation."""
    dtype, dev, n = x0.dtype, x0.device, x0.shape[0]
    f64 = torch.float64
    sc = torch.tensor(SCALE[:3] + SCALE[4:], dtype=f64, device=dev)
    eye = torch.eye(7, dtype=f64, device=dev)
    base = _cast_base(_base_from_x(x0.to(f64)), dtype)
    if h0 is None:
        fs = _fisher_fd(response, likelihood, obs, base, dtype, sc)
        fs = torch.nan_to_num(fs, nan=0.0, posinf=0.0, neginf=0.0)
        diag = torch.diagonal(fs, dim1=1, dim2=2).clamp_min(1e-3)
        hz, info = torch.linalg.inv_ex(fs + 0.1 * torch.diag_embed(diag) + 1e-3 * eye)
        hz = torch.where(((info == 0) & torch.isfinite(hz).all(-1).all(-1))[:, None, None], hz, eye)
    else:
        hz = torch.where(torch.isfinite(h0).all(-1).all(-1)[:, None, None], h0.to(f64), eye)

    def nll(y: Tensor, idx: Tensor) -> Tensor:
        pred = response.expected(_local_to_params(y, {k: v[idx] for k, v in base.items()}))
        return likelihood(pred, _select_obs(obs, idx))

    def rebase(z: Tensor, nd: Tensor) -> Tensor:
        """Re-centre the local coordinates of the events nd whose direction turned far (H is kept: same
        scales); returns those events."""
        far = nd[(z[nd, 3:5] * sc[3:5]).norm(dim=-1) > BFGS_REBASE]
        if far.numel():
            xf = _x_from_local((z[far] * sc).to(dtype), {k: v[far] for k, v in base.items()}).to(f64)
            for k, v in _cast_base(_base_from_x(xf, base["row"][far]), dtype).items():
                base[k][far] = v
        return far

    value_grad = _scaled_value_grad(nll, sc, dtype)
    z, iters, hz = _bfgs_loop(
        value_grad, torch.zeros(n, 7, dtype=f64, device=dev), hz, max_iter, tol, trace, rebase
    )
    x = _x_from_local((z * sc).to(dtype), base)
    return x.detach(), int(iters.max()), hz


def _bent_stage(
    out: dict[str, Tensor],
    status: Tensor,
    idx: Tensor,
    obs: dict[str, Tensor],
    base: dict[str, Tensor],
    response,
    likelihood,
    det,
    n_modes: int,
    dtype: torch.dtype,
    max_iter: int,
) -> None:
    """Refine the straight fits of the rows idx as bent tracks (``kink_modes`` of :func:`reconstruct`). A
    straight track whose rings are smeared by the accumulated multiple scattering (the reconstruction's model)
    fitted to one scattered track is pulled off it: WCTE 500 MeV muons +0.9 cm along the track and 7.8 cm in
    the vertex (68 %), SK +32 cm and 46 cm (benchmarks/ms_bent_fit.py). Here the track is bent explicitly by M
    kink modes per transverse axis (:func:`fitting.uncertainty.kink_modes`: the leading Karhunen-Loeve modes
    of the Highland kinks on the response's track nodes, amplitudes a ~ N(0, 1)), its rings sharp but smeared
    by the kinks outside the modes (``node_ms``), and the NLL + |a|^2 / 2 is minimised over the 7 event
    parameters and the 2 M amplitudes (a maximum a posteriori fit of the kink amplitudes with their Gaussian
    prior; the nuisance-parameter treatment of e.g. Barlow, "Systematic errors: facts and fictions", 2002) by
    :func:`_bfgs_loop` from the straight fit (amplitudes 0; the inverse-Hessian estimate starts from the
    straight fit's H^-1 and 1/2 for the amplitudes), then one float64 Newton step with the exact Hessian H of
    all 7 + 2 M coordinates. cov_hessian is the event block of H^-1 (marginal over the amplitudes); cov adds
    the fit's linear response to the kinks outside the modes
    (:func:`fitting.uncertainty.kink_response_covariance` with ``fitted_modes``; vertex and direction). The
    likelihood is the response's Poisson / charge / time one without the over-dispersion of
    ``ms_relative_variance`` (the kinks it stands for are now fitted). Rows whose Hessian is not positive
    definite, whose values are not finite or whose vertex leaves the detector keep the straight fit. Writes
    straight_* (the straight fit) and kink_amplitudes (E,2M) for the rows and overwrites vertex, direction,
    energy, t0, nll (the bent NLL with the prior), cov, cov_hessian and e1 / e2 where the bent fit is kept
    (status ``bent``).
    """
    f64, dev = torch.float64, idx.device
    for k in ("vertex", "direction", "energy", "t0", "nll", "cov"):
        out["straight_" + k][idx] = out[k][idx]
    x = torch.cat(
        [
            out["vertex"][idx],
            out["direction"][idx],
            out["energy"][idx].log()[:, None],
            out["t0"][idx][:, None],
        ],
        1,
    )
    live = torch.isfinite(x).all(-1) & torch.isfinite(out["nll"][idx])
    if not bool(live.any()):
        return
    sel = live.nonzero()[:, 0]
    rows = idx[sel]
    b64 = _base_from_x(x[sel], base["row"][sel])
    with torch.no_grad():
        kinks = response.ms_kinks(_local_to_params(torch.zeros(sel.numel(), 7, dtype=f64, device=dev), b64))
    if kinks is None:
        raise ConfigError(
            f"kink_modes: got {n_modes}, but the response models no multiple-scattering kinks "
            "(response.ms_kinks is None: showers, the isotropic source, or ms_covariance / fold_wavelength "
            "off); allowed: 0"
        )
    km = kink_modes(kinks["s"], kinks["var"], n_modes)
    m2 = 2 * n_modes
    sc = torch.tensor(SCALE[:3] + SCALE[4:] + (1.0,) * m2, dtype=f64, device=dev)
    obs_s = {k: v.index_select(0, sel) for k, v in obs.items() if k != "mu_rel_var"}

    def nll_fn(dt: torch.dtype):
        bb = _cast_base(b64, dt)
        turn, disp, rest = (km[k].to(dt) for k in ("turn", "disp", "rest"))
        od = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in obs_s.items()}

        def f(y: Tensor, i: Tensor, extra: Tensor | None = None) -> Tensor:
            """The objective at y (the rows i); extra (N,K,6): node offsets on top of the modes'."""
            y = y.to(dt)
            b = {k: v[i] for k, v in bb.items()}
            off = kink_mode_offsets(y[:, 7:], turn[i], disp[i], b["e1"], b["e2"])
            if extra is not None:
                off = off + extra.to(dt)
            p = {**_local_to_params(y[:, :7], b), "node_offset": off, "node_ms": rest[i]}
            return likelihood(response.expected_kinked(p), _select_obs(od, i)) + 0.5 * (y[:, 7:] ** 2).sum(1)

        return f

    f64_nll = nll_fn(f64)
    n = sel.numel()
    hz = torch.zeros(n, 7 + m2, 7 + m2, dtype=f64, device=dev)
    h7 = out["cov_hessian"][rows] / (sc[:7, None] * sc[None, :7])
    good = torch.isfinite(h7).all(-1).all(-1)
    hz[:, :7, :7] = torch.where(good[:, None, None], h7, torch.eye(7, dtype=f64, device=dev))
    hz[:, 7:, 7:] = 0.5 * torch.eye(m2, dtype=f64, device=dev)
    value_grad = _scaled_value_grad(nll_fn(dtype), sc, dtype)
    z, _, _ = _bfgs_loop(value_grad, torch.zeros(n, 7 + m2, dtype=f64, device=dev), hz, max_iter, BFGS_TOL)
    y = z * sc
    every = torch.arange(n, device=dev)
    # the Hessian with the mixed derivatives w.r.t. node offsets: the fit's response to the kinks outside
    # the modes (as the straight fit's to all kinks)
    zero_off = torch.zeros(n, kinks["s"].shape[1], 6, dtype=f64, device=dev)
    nll, g, h, mixed = _hessian(lambda yy, oo: f64_nll(yy, every, oo), y, zero_off)
    hinv, pd = crb_covariance(h)
    y, nll = _newton_step(lambda yy: f64_nll(yy, every), y, nll, g, hinv, pd)
    with torch.no_grad():
        p = _local_to_params(y[:, :7], b64)
    keep = pd & torch.isfinite(nll) & torch.isfinite(p["vertex"]).all(-1) & torch.isfinite(p["energy"])
    if det is not None:
        keep = keep & det.inside(p["vertex"].to(det.pmt_pos.dtype)).to(dev)
    k_rows = rows[keep]
    out["kink_amplitudes"][rows] = y[:, 7:]
    for k in ("vertex", "direction", "energy", "t0"):
        out[k][k_rows] = p[k][keep]
    out["nll"][k_rows] = nll[keep]
    out["cov_hessian"][k_rows] = hinv[keep][:, :7, :7]
    e1, e2 = b64["e1"][keep], b64["e2"][keep]
    rest_cov = kink_response_covariance(
        hinv[keep], mixed[keep], kinks["s"][keep], kinks["var"][keep], e1, e2, km["basis"][keep]
    )
    out["cov"][k_rows] = (hinv[keep] + rest_cov)[:, :7, :7]
    out["e1"][k_rows] = e1
    out["e2"][k_rows] = e2
    status[k_rows] |= STATUS["bent"]


def _starts(seed: dict[str, Tensor], n_starts: int) -> list[Tensor]:
    """Start points (each (E,8)): the seed; the vertex moved back along the direction by 30% of the
    muon's CSDA range estimate R ~ T / (230 MeV/m) (the point fit sits near the track's light centroid);
    the flipped direction; the vertex moved forward."""
    v, d, e, t0 = seed["vertex"], seed["direction"], seed["energy"], seed["t0"]
    loge = torch.log(e)[:, None]
    rng = (e / 230.0).clamp(0.2, 5.0)[:, None]
    cands = [
        (v, d),
        (v - 0.3 * rng * d, d),
        (v, -d),
        (v + 0.2 * rng * d, d),
    ]
    return [torch.cat([vv, dd, loge, t0[:, None]], 1) for vv, dd in cands[:n_starts]]


def reconstruct(
    hits: Any,
    n_events: int,
    response,
    likelihood,
    particle: str = "mu-",
    seeds: dict[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    n_starts: int = 2,
    optimiser: str = "bfgs",
    *,
    max_iter: int = 60,
    adam_lr: float = 0.3,
    newton_steps: int = 2,
    tol_decrement: float = 0.1,
    min_hits: int = 5,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float64,
    n_group: float = 1.38,
    uncertainties: bool = True,
    trace: list[float] | None = None,
    kink_modes: int = 0,
) -> dict[str, Tensor]:
    """Fit every event; returns a dict of per-event results (E = n_events rows, NaN where not fitted).

    hits: record with pmt (N,) long, charge (N,) [p.e.], time (N,) [ns], event (N,) long (physics.records.Hits
    or anything with those attributes); response: ResponseModel for ``particle`` (its ``n_pmts``; optional
    ``detector`` with ``inside(points)`` and ``pmt_pos`` (P,3) used for the containment flag and the pre-fit);
    likelihood: per-event NLL module; seeds: optional dict vertex (E,3), direction (E,3), energy (E,), t0 (E,)
    (default: :func:`fitting.prefit.prefit`); n_starts: 1-4 start points per event (see ``_starts``);
    optimiser: 'bfgs' (default, the fastest measured: per-event BFGS from the Fisher matrix,
    ``_optimise_bfgs``), 'lbfgs' (torch L-BFGS, strong-Wolfe line search shared by the batch), 'lm' (Fisher
    scoring with Levenberg-Marquardt damping, ``_optimise_lm``: ~10 Jacobians in WCTE) or 'adam';
    max_iter: optimiser iterations; dtype of the fit and of its Hessian (the reported NLL and the polish's
    step acceptance are float64); trace: list to which the mean NLL per evaluation is appended;
    kink_modes: M > 0 refines each straight track fit as a bent track with M multiple-scattering kink modes
    per transverse axis as nuisance parameters (``_bent_stage``; tracks whose response models the kinks,
    ``response.ms_kinks``; needs ``uncertainties``): the reported fit is then the bent track's (status bit
    ``bent``) and the straight fit is kept as straight_vertex, straight_direction, straight_energy,
    straight_t0, straight_nll, straight_cov, with the fitted amplitudes kink_amplitudes (E,2M).

    Returns: vertex (E,3) [m], direction (E,3) unit, energy (E,) [MeV], t0 (E,) [ns], nll (E,),
    cov (E,7,7) in local coordinates (v, a, b, log E, t0) = H^-1 + the covariance of the fit's linear response
    to the track's multiple-scattering kinks when the response models them (``response.ms_kinks``;
    :func:`fitting.uncertainty.kink_response_covariance`),
    cov_hessian (E,7,7) H^-1 alone (F^-1 where status has fisher_cov), sigma_vertex (E,3) [m],
    sigma_dir (E,2) [rad] (along e1, e2), sigma_energy (E,) [MeV], sigma_t0 (E,) [ns], status (E,) int32,
    n_hits (E,), n_iter (E,), start (E,) best start index (n_starts: the restart of a stopping track fitted
    past the wall, from the energy whose range ends there, ``response.contained_energy``), seed_* (the
    pre-fit seeds), e1/e2 (E,3) the tangent basis at the fit.
    Raises ConfigError for n_events < 1, an unsupported particle or optimiser, or PMT indices out of range.
    """
    n_events = check_number(n_events, "n_events", minimum=1, integer=True)
    check_choice(optimiser, "optimiser", OPTIMISERS)
    check_number(n_starts, "n_starts", minimum=1, maximum=4, integer=True)
    if particle not in FIT_OK:
        raise ConfigError(f"particle: got {particle!r}, allowed: {list(FIT_OK)}")
    if optimiser == "lm" and particle not in TRACK_OK:
        raise ConfigError(
            f"optimiser: got 'lm' for particle {particle!r}; 'lm' needs forward-mode derivatives, which the "
            f"shower profile lacks: allowed for {list(TRACK_OK)}; use 'bfgs', 'lbfgs' or 'adam'"
        )
    kink_modes = check_number(kink_modes, "kink_modes", minimum=0, integer=True)
    if kink_modes and (particle not in TRACK_OK or not uncertainties):
        raise ConfigError(
            f"kink_modes: got {kink_modes} for particle {particle!r} with uncertainties={uncertainties}; "
            f"kink modes need a track ({list(TRACK_OK)}) and uncertainties=True (the straight fit's Hessian "
            "starts the bent fit); allowed: 0 otherwise"
        )
    n_nodes = getattr(response, "n_track_nodes", None)
    if kink_modes and n_nodes is not None and kink_modes > int(n_nodes):
        raise ConfigError(
            f"kink_modes: got {kink_modes}, allowed: 0 to the response's track nodes ({int(n_nodes)})"
        )
    rp = getattr(response, "particle", particle)
    if rp != particle:
        raise ConfigError(
            f"particle: got {particle!r} but the response model is for {rp!r} (e/mu identification fits each "
            "hypothesis with its own response: fitting.pid.identify)"
        )
    dev = torch.device(device)
    n_pmts = int(response.n_pmts)
    det = getattr(response, "detector", None)
    pmt_pos = det.pmt_pos.to(dev, torch.float64) if det is not None else None
    if pmt_pos is None:
        raise ConfigError("response: needs a .detector with pmt_pos (P,3) for the pre-fit")

    pmt = torch.as_tensor(hits.pmt, device=dev).long()
    ev = torch.as_tensor(hits.event, device=dev).long()
    q = torch.as_tensor(hits.charge, device=dev).to(torch.float64)
    tt = torch.as_tensor(hits.time, device=dev).to(torch.float64)
    status = torch.zeros(n_events, dtype=torch.int32, device=dev)
    if ev.numel() and (int(ev.min()) < 0 or int(ev.max()) >= n_events):
        raise ConfigError(
            f"hits.event: values in [{int(ev.min())}, {int(ev.max())}], allowed [0, {n_events - 1}]"
        )
    bad_hit = ~(torch.isfinite(q) & torch.isfinite(tt))
    bad_ev = torch.zeros(n_events, dtype=torch.bool, device=dev)
    bad_ev[ev[bad_hit]] = True
    status[bad_ev] |= STATUS["bad_input"]
    keep = ~bad_ev[ev]
    obs_all = hits_to_dense(pmt[keep], q[keep], tt[keep], ev[keep], n_events, n_pmts)
    n_hits = obs_all["hit"].sum(1)
    few = (n_hits < min_hits) & ~bad_ev
    status[few] |= STATUS["no_hits"]
    fit_idx = (~bad_ev & ~few).nonzero()[:, 0]

    nan = float("nan")
    out = {
        "vertex": torch.full((n_events, 3), nan, dtype=torch.float64, device=dev),
        "direction": torch.full((n_events, 3), nan, dtype=torch.float64, device=dev),
        "energy": torch.full((n_events,), nan, dtype=torch.float64, device=dev),
        "t0": torch.full((n_events,), nan, dtype=torch.float64, device=dev),
        "nll": torch.full((n_events,), nan, dtype=torch.float64, device=dev),
        "cov": torch.full((n_events, 7, 7), nan, dtype=torch.float64, device=dev),
        "cov_hessian": torch.full((n_events, 7, 7), nan, dtype=torch.float64, device=dev),
        "e1": torch.full((n_events, 3), nan, dtype=torch.float64, device=dev),
        "e2": torch.full((n_events, 3), nan, dtype=torch.float64, device=dev),
        "n_iter": torch.zeros(n_events, dtype=torch.int32, device=dev),
        "start": torch.full((n_events,), -1, dtype=torch.int32, device=dev),
        "n_hits": n_hits.to(torch.int32),
    }
    for k in ("vertex", "direction", "energy", "t0"):
        out["seed_" + k] = out[k].clone()
    if kink_modes:
        for k in ("vertex", "direction", "energy", "t0", "nll", "cov"):
            out["straight_" + k] = out[k].clone()
        out["kink_amplitudes"] = torch.full((n_events, 2 * kink_modes), nan, dtype=torch.float64, device=dev)
    if fit_idx.numel() == 0:
        out["status"] = status
        _sigmas(out)
        return out

    obs_fit = _select_obs(obs_all, fit_idx)
    mu_dark = float(likelihood.mu_dark.mean()) if hasattr(likelihood, "mu_dark") else 0.0
    keys = ("vertex", "direction", "energy", "t0")
    user = {}
    if seeds is not None:
        user = {
            k: torch.as_tensor(seeds[k], device=dev, dtype=torch.float64)[fit_idx] for k in keys if k in seeds
        }
    need_prefit = len(user) < len(keys)  # complete user seeds (e.g. from fitting.pid): no second pre-fit
    if "vertex" in user and det is not None:
        inside = det.inside(user["vertex"].to(det.pmt_pos.dtype)).to(dev)
        status[fit_idx[~inside]] |= STATUS["seed_outside"]
        need_prefit = need_prefit or not bool(inside.all())
    if need_prefit:
        seed = prefit(obs_fit, pmt_pos, response, n_group=n_group, mu_dark=mu_dark)
    else:
        seed = {k: user[k].clone() for k in keys}
    if "vertex" in user and det is not None:
        user["vertex"] = torch.where(inside[:, None], user["vertex"], seed["vertex"])
    seed.update(user)
    for k in ("vertex", "direction", "energy", "t0"):
        out["seed_" + k][fit_idx] = seed[k]

    try:
        for a in range(0, fit_idx.numel(), batch_size):
            sl = slice(a, a + batch_size)
            idx = fit_idx[sl]
            _fit_batch(
                out,
                status,
                idx,
                _select_obs(obs_fit, torch.arange(a, a + idx.numel(), device=dev)),
                {k: v[sl] for k, v in seed.items()},
                response,
                likelihood,
                det,
                optimiser,
                n_starts,
                max_iter,
                adam_lr,
                newton_steps,
                tol_decrement,
                dtype,
                uncertainties,
                trace,
                kink_modes,
            )
    finally:
        if hasattr(response, "release_indirect"):
            response.release_indirect()
    out["status"] = status
    _sigmas(out)
    return out


def _fit_batch(
    out,
    status,
    idx,
    obs,
    seed,
    response,
    likelihood,
    det,
    optimiser,
    n_starts,
    max_iter,
    adam_lr,
    newton_steps,
    tol_decrement,
    dtype,
    uncertainties,
    trace,
    kink_modes: int = 0,
) -> None:
    """Fit one batch (then its bent-track stage, ``_bent_stage``, when kink_modes > 0). A response with
    indirect light (``freeze_indirect``) keeps its traced photons fixed during the fit: frozen at the starts,
    then at the best start for the float64 polish (released by the caller). A response with
    ``ms_relative_variance`` (over-dispersed counts) gets it at the best start: the float64 Newton polish,
    the Hessian and the reported NLL use the negative-binomial likelihood with it."""
    ne = idx.numel()
    starts = _starts(seed, n_starts)
    x0 = torch.cat(starts).to(dtype)
    freeze = getattr(response, "freeze_indirect", None)
    if freeze is not None:
        with torch.no_grad():
            freeze(_unpack(x0))
    obs_rep = {k: torch.cat([v] * len(starts)) for k, v in obs.items()}
    f = _nll_fn(response, likelihood, obs_rep)

    def run(obs_in: dict[str, Tensor], x_in: Tensor, tr: list[float] | None):
        """The optimiser from x_in: (x, iterations, BFGS inverse-Hessian estimates or None)."""
        if optimiser == "bfgs":
            return _optimise_bfgs(response, likelihood, obs_in, x_in, max_iter, BFGS_TOL, tr)
        if optimiser == "lm":
            return (*_optimise_lm(response, likelihood, obs_in, x_in, max_iter, LM_TOL, tr), None)
        f_in = _nll_fn(response, likelihood, obs_in)
        return (*_optimise(lambda z: f_in(_unpack(z)), x_in, optimiser, max_iter, adam_lr, tr), None)

    x, n_iter, hz = run(obs_rep, x0, trace)
    with torch.no_grad():
        nll = f(_unpack(x)).view(len(starts), ne)
        nll = torch.where(torch.isfinite(nll), nll, torch.full_like(nll, math.inf))
        nll_best, best = nll.min(0)
    pick = best * ne + torch.arange(ne, device=x.device)  # rows of the best starts in (starts x events)
    xb = x[pick].to(torch.float64)
    h0 = None if hz is None else hz[pick]
    # a stopping track fitted past the wall sits on a plateau (the light beyond the wall is cut, so the
    # energy has almost no gradient): restart those fits from the energy whose range ends at the wall and
    # keep the lower NLL (response.contained_energy; traced indirect photons frozen at the restart)
    cap = response.contained_energy(_unpack(xb)) if hasattr(response, "contained_energy") else None
    if cap is not None:
        cap = cap.to(device=xb.device, dtype=torch.float64)
        past = (cap > 0) & (torch.exp(xb[:, 6]) > WALL_RESTART * cap)
        if bool(past.any()):
            sel = past.nonzero()[:, 0]
            xr0 = xb[sel].clone()
            xr0[:, 6] = torch.log(cap[sel] / WALL_RESTART)
            obs_s = _select_obs(obs, sel)
            if freeze is not None:
                with torch.no_grad():
                    freeze(_unpack(xr0.to(dtype)))
            xr, n_r, hr = run(obs_s, xr0.to(dtype), None)
            with torch.no_grad():
                nll_r = _nll_fn(response, likelihood, obs_s)(_unpack(xr))
            better = torch.isfinite(nll_r) & (nll_r < nll_best[sel])
            rows = sel[better]
            xb[rows] = xr[better].to(torch.float64)
            best[rows] = len(starts)
            if h0 is not None and hr is not None:
                h0[rows] = hr[better]
            n_iter = n_iter + n_r
    base = _base_from_x(xb)
    y = torch.zeros(ne, 7, dtype=torch.float64, device=x.device)
    # over-dispersed counts (response.ms_relative_variance, e.g. multiple scattering): the optimiser above
    # found the Poisson minimum; the relative variance is taken there and held fixed; BFGS continues from
    # there with it (cheaper than the extra Newton step the polish would otherwise need), then the float64
    # polish and the Hessian use it too
    rel_var = None
    if uncertainties and hasattr(response, "ms_relative_variance"):
        with torch.no_grad():
            rel_var = response.ms_relative_variance(_local_to_params(y, base))
        if rel_var is not None and optimiser == "bfgs":
            if freeze is not None:
                with torch.no_grad():
                    freeze(_unpack(xb.to(dtype)))
            obs_nb = {**obs, "mu_rel_var": rel_var.to(dtype)}
            # the Poisson run's inverse-Hessian estimates start it (same coordinates and scales; the
            # negative binomial's curvature is close): no second Fisher pass
            x2, n2, _ = _optimise_bfgs(
                response, likelihood, obs_nb, xb.to(dtype), max_iter, BFGS_TOL, trace, h0=h0
            )
            n_iter = n_iter + n2
            ok2 = torch.isfinite(x2).all(-1)
            xb = torch.where(ok2[:, None], x2.to(torch.float64), xb)
            base = _base_from_x(xb)
    obs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in obs.items()}
    if rel_var is not None:
        obs64["mu_rel_var"] = rel_var.double()
    floc = _local_nll(response, likelihood, obs64, base, torch.float64)
    # the Hessian (and gradient, mixed derivatives) in the fit's dtype about the same float64 point
    floc_h = floc if dtype == torch.float64 else _local_nll(response, likelihood, obs64, base, dtype)

    if freeze is not None:
        with torch.no_grad():
            freeze(_local_to_params(y, base))
    cov = torch.full((ne, 7, 7), float("nan"), dtype=torch.float64, device=x.device)
    converged = torch.zeros(ne, dtype=torch.bool, device=x.device)
    pd = torch.zeros(ne, dtype=torch.bool, device=x.device)
    nll_b = floc(y).detach()
    # multiple-scattering kinks of the track (response.ms_kinks): their mixed derivatives come with the first
    # Hessian (the polish moves the point by a fraction of a sigma; the linear response barely changes)
    kinks = None
    if uncertainties and hasattr(response, "ms_kinks"):
        with torch.no_grad():
            kinks = response.ms_kinks(_local_to_params(y, base))
    mixed = None
    observed = uncertainties and bool(getattr(response, "hessian_reliable", True))
    if observed:
        for it in range(newton_steps + 1):
            off = None
            if it == 0 and kinks is not None:
                off = torch.zeros(ne, kinks["s"].shape[1], 6, dtype=torch.float64, device=x.device)
            _, g, h, mix = _hessian(floc_h, y, off)
            g, h = g.double(), h.double()
            mixed = mix.double() if mix is not None else mixed
            hinv, pd = crb_covariance(h)  # H^-1 (NaN where H is not positive definite)
            dec = (g * (hinv @ g[..., None])[..., 0]).sum(-1)  # Newton decrement g^T H^-1 g
            converged = pd & (dec < tol_decrement)
            cov = hinv
            # Newton step, accepted per event when the NLL decreases; taken after the last Hessian too (one
            # forward pass), so a converged minimum is good to O(decrement^2) (cov: the Hessian just computed)
            y, nll_b = _newton_step(floc, y, nll_b, g, hinv, pd)
            if it == newton_steps or bool(converged.all()):
                break
    fisher = torch.zeros(ne, dtype=torch.bool, device=x.device)
    if uncertainties:  # observed Hessian not positive definite or not meaningful: Fisher scoring, covariance
        fisher = (~pd | (not observed)) & torch.isfinite(nll_b)
    if bool(fisher.any()):
        sel = fisher.nonzero()[:, 0]
        with torch.no_grad():
            x_sel = _x_from_local(y[sel], {k: v[sel] for k, v in base.items()})
            if freeze is not None:  # traced indirect photons for this subset, fixed through its polish
                freeze(_unpack(x_sel))
        x_f, nll_f, cov_f, conv_f, pd_f = _fisher_polish(
            response,
            likelihood,
            _nll_fn(response, likelihood, _select_obs(obs64, sel)),
            x_sel,
            newton_steps,
            tol_decrement,
        )
        for k, v in _base_from_x(x_f, base["row"][sel]).items():
            base[k][sel] = v
        y[sel] = 0.0
        nll_b[sel], cov[sel], converged[sel], pd[sel] = nll_f, cov_f, conv_f, pd_f
    with torch.no_grad():
        p = _local_to_params(y, base)
    if not uncertainties:  # no Hessian: trust the optimiser's own stopping rule (tolerance before the cap)
        converged = torch.full((ne,), n_iter < max_iter, dtype=torch.bool, device=x.device)
    st = torch.zeros(ne, dtype=torch.int32, device=x.device)
    st[converged] |= STATUS["converged"]
    if uncertainties:
        st[~pd] |= STATUS["hessian_not_pd"]
        st[fisher & pd] |= STATUS["fisher_cov"]
    st[~converged & (n_iter >= max_iter)] |= STATUS["max_iter"]
    finite = torch.isfinite(nll_b) & torch.isfinite(p["vertex"]).all(-1) & torch.isfinite(p["energy"])
    st[~finite] |= STATUS["nonfinite"]
    if det is not None:
        inside = det.inside(p["vertex"].to(det.pmt_pos.dtype)).to(x.device)
        st[~inside] |= STATUS["outside"]
    status[idx] |= st
    out["vertex"][idx] = p["vertex"]
    out["direction"][idx] = p["direction"]
    out["energy"][idx] = p["energy"]
    out["t0"][idx] = p["t0"]
    out["nll"][idx] = nll_b
    out["cov_hessian"][idx] = cov  # H^-1 alone; reported cov adds the fit's response to MS kinks
    if mixed is not None:
        cov = cov + kink_response_covariance(cov, mixed, kinks["s"], kinks["var"], base["e1"], base["e2"])
    out["cov"][idx] = cov
    out["e1"][idx] = base["e1"]
    out["e2"][idx] = base["e2"]
    if kink_modes:
        _bent_stage(out, status, idx, obs, base, response, likelihood, det, kink_modes, dtype, max_iter)
        p = {k: out[k][idx] for k in ("vertex", "direction", "energy", "t0")}
        cov = out["cov"][idx]
    # a track whose fitted range reaches the wall: the light beyond the wall that would have told the energy
    # is missing, and what constrains it from above is only the end's sharper rings (less multiple scattering
    # at a higher energy), a weak, one-sided handle (1 GeV muons in WCTE end within cm of the wall: fits
    # landed up to 23 % past it with sigma(log E) 0.3 %, benchmarks/bench_resolution.py)
    cap = response.contained_energy(p) if hasattr(response, "contained_energy") else None
    if cap is not None:
        cap = cap.to(device=x.device, dtype=torch.float64)
        sig = torch.sqrt(cov[:, 5, 5].clamp_min(0.0))  # the reported covariance (kink response included)
        sig = torch.where(torch.isfinite(sig), sig, torch.zeros_like(sig))
        reach = (cap > 0) & (p["energy"].to(torch.float64) >= cap * torch.exp(-END_AT_WALL_SIGMA * sig))
        status[idx[reach]] |= STATUS["end_at_wall"]
    out["n_iter"][idx] = int(n_iter)
    out["start"][idx] = best.to(torch.int32)


def _sigmas(out: dict[str, Tensor]) -> None:
    var = torch.diagonal(out["cov"], dim1=1, dim2=2)
    sd = torch.sqrt(var.clamp_min(0.0))
    out["sigma_vertex"] = sd[:, 0:3]
    out["sigma_dir"] = sd[:, 3:5]
    out["sigma_energy"] = out["energy"] * sd[:, 5]
    out["sigma_t0"] = sd[:, 6]
    out["ok"] = ((out["status"] & STATUS["converged"]) > 0) & ((out["status"] & FAILED) == 0)


# ----------------------------------------------------------------------------------------------------------
# residuals vs truth
# ----------------------------------------------------------------------------------------------------------
def resolutions(
    fit: dict[str, Tensor], truth: dict[str, Tensor], mask: Tensor | None = None
) -> dict[str, Any]:
    """Residuals, pulls and 68% quantiles vs truth (vertex (E,3), direction (E,3), energy (E,)).

    Returns dict with per-event arrays (dv (E,3), vertex_dist (E,), angle (E,) [rad], de_frac (E,),
    pulls (E,7) in the fit's local coordinates: v (3), a, b, log E (t0 NaN: no true t0)) and the summary
    numbers vertex_68 [m], angle_68 [deg], energy_68 (fractional), bias and pull mean/std per coordinate.
    Fits whose track reaches the wall (status end_at_wall, when fit has a status) have a lower-limit
    energy: their mask is returned as end_at_wall, their number as summary n_end_at_wall, and the energy
    68 % of the other fits as summary energy_68_frac_not_at_wall."""
    dv = fit["vertex"] - truth["vertex"].to(fit["vertex"])
    td = truth["direction"].to(fit["direction"])
    td = td / td.norm(dim=-1, keepdim=True)
    cosang = (fit["direction"] * td).sum(-1).clamp(-1.0, 1.0)
    angle = torch.acos(cosang)
    de = fit["energy"] / truth["energy"].to(fit["energy"]) - 1.0
    # direction residual in the fit's tangent plane (small-angle: projections of the true direction)
    ra = (td * fit["e1"]).sum(-1)
    rb = (td * fit["e2"]).sum(-1)
    dlog = torch.log(fit["energy"] / truth["energy"].to(fit["energy"]))
    sd = torch.sqrt(torch.diagonal(fit["cov"], dim1=1, dim2=2).clamp_min(0.0))
    res7 = torch.stack([dv[:, 0], dv[:, 1], dv[:, 2], -ra, -rb, dlog, torch.full_like(ra, float("nan"))], 1)
    pulls = res7 / sd
    m = fit["ok"] if mask is None else mask
    m = m & torch.isfinite(pulls[:, :6]).all(-1)

    wall = torch.zeros_like(m)
    if "status" in fit:
        wall = m & ((fit["status"] & STATUS["end_at_wall"]) > 0)

    def q68(x: Tensor, sel: Tensor = m) -> float:
        return float(torch.quantile(x[sel], 0.68)) if int(sel.sum()) else float("nan")

    names = ["x", "y", "z", "dir_a", "dir_b", "log_e"]
    summ = {
        "n_ok": int(m.sum()),
        "vertex_68_m": q68(dv.norm(dim=-1)),
        "angle_68_deg": math.degrees(q68(angle)) if int(m.sum()) else float("nan"),
        "energy_68_frac": q68(de.abs()),
        "n_end_at_wall": int(wall.sum()),
        "energy_68_frac_not_at_wall": q68(de.abs(), m & ~wall),
        "bias": {n: float(res7[m, i].mean()) if int(m.sum()) else float("nan") for i, n in enumerate(names)},
        "bias_err": {
            n: float(res7[m, i].std() / math.sqrt(max(int(m.sum()), 1))) if int(m.sum()) > 1 else float("nan")
            for i, n in enumerate(names)
        },
        "pull_mean": {
            n: float(pulls[m, i].mean()) if int(m.sum()) else float("nan") for i, n in enumerate(names)
        },
        "pull_std": {
            n: float(pulls[m, i].std()) if int(m.sum()) > 1 else float("nan") for i, n in enumerate(names)
        },
    }
    return {
        "dv": dv,
        "vertex_dist": dv.norm(dim=-1),
        "angle": angle,
        "de_frac": de,
        "pulls": pulls,
        "mask": m,
        "end_at_wall": wall,
        "summary": summ,
    }


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def physics_response_for_run(
    config: dict[str, Any],
    *,
    detector_table: dict[str, Any] | None = None,
    sensor_values: dict[str, Any] | None = None,
    n_track_nodes: int = 32,
    n_depth_nodes: int = 24,
    ms_samples: int = 0,
    indirect_trace: int = 0,
    device: str = "cpu",
):
    """PhysicsResponse + HitLikelihood matching the simulation config of a run file (config['simulation'];
    the medium's scale parameters from config['medium_scales'] when the file records them, the optics'
    reflectivities from config['optics'], the sensor model from config['sensors'] as recorded);
    detector_table: the run's recorded detector (RunData.detector: name, shape, radius, height and the PMT
    table), used instead of the named preset when given;
    sensor_values: the run's per-PMT sensor values (RunData.sensors: qe_scale, gain, time_offset (P,));
    the response is the run's particle's (FIT_OK: a track on n_track_nodes cells or an EM cascade on
    n_depth_nodes depth cells), a muon's for any other source (e.g. an isotropic calibration run);
    ms_samples: sampled kink sets of the multiple-scattering over-dispersion (PhysicsResponse, 0: Poisson);
    indirect_trace: traced photons per event of the expected scattered and reflected light, held as a frozen
    per-PMT template during the fit (PhysicsResponse indirect template; 0: direct light only)."""
    from physics.geometry import Detector
    from physics.medium import Medium
    from physics.optics import Optics
    from physics.sensors import PMTResponse
    from physics.simulate import _sensor_config_for

    from .likelihood import HitLikelihood
    from .response import PhysicsResponse

    ind = indirect_template(indirect_trace)
    sim = config.get("simulation", config)
    particle = sim.get("particle", "mu-")
    if detector_table is not None:  # the detector the run was made with, as recorded
        t = detector_table
        det = Detector(
            t["name"], t["shape"], t["radius"], t["height"], t["pmt_pos"], t["pmt_normal"], t["pmt_radius"]
        ).to(device)
    else:
        det = Detector.load(sim.get("detector", "wcte")).to(device)
    med = Medium.load(sim.get("medium", "water")).to(device)
    if "medium_scales" in config:  # the run's values (absent from files written before they were recorded)
        med.set_scales(config["medium_scales"], "run config medium_scales")
    if isinstance(config.get("sensors"), dict):  # the run's resolved sensor model, as it was
        sen = PMTResponse(config["sensors"], n_pmts=det.n_pmts).to(device)
    else:
        sname = sim.get("sensors", "auto")
        sen = PMTResponse.load(_sensor_config_for(det) if sname == "auto" else sname, n_pmts=det.n_pmts).to(
            device
        )
    if sensor_values is not None:
        sen.set_per_pmt_values(dict(sensor_values), "run sensors")
    # the run's reflectivities as recorded (config['optics']) over the request's optics
    opt = Optics.from_config({**(sim.get("optics", {}) or {}), **(config.get("optics", {}) or {})})
    if particle in FIT_OK and particle not in TRACK_OK:
        if ms_samples:
            raise ConfigError(
                f"ms_samples: got {ms_samples} for a {particle!r} run; the multiple-scattering "
                f"over-dispersion is modelled for tracks {list(TRACK_OK)}, allowed here: 0"
            )
        shape = {"n_depth_nodes": n_depth_nodes}
    else:
        shape = {"n_track_nodes": n_track_nodes, "fold_wavelength": True, "ms_samples": ms_samples}
    resp = PhysicsResponse(
        det, med, sen, particle if particle in FIT_OK else "mu-", opt, indirect=ind, **shape
    )
    cfg = resp.likelihood_config()
    window = tuple(sim.get("dark_window_ns", (-100.0, 400.0)))
    like = HitLikelihood(**cfg, window=window).to(device)
    return resp, like, particle


def _write_h5(path: Path, fit: dict[str, Tensor], meta: dict[str, Any], overwrite: bool) -> None:
    import json

    import h5py

    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} exists; pass --overwrite")
    units = {
        "vertex": "m",
        "direction": "1",
        "energy": "MeV",
        "t0": "ns",
        "nll": "1",
        "cov": "local",
        "cov_hessian": "local",
        "sigma_vertex": "m",
        "sigma_dir": "rad",
        "sigma_energy": "MeV",
        "sigma_t0": "ns",
        "status": "bits",
        "ok": "1",
        "n_hits": "1",
        "n_iter": "1",
        "start": "1",
        "seed_vertex": "m",
        "seed_direction": "1",
        "seed_energy": "MeV",
        "seed_t0": "ns",
        "e1": "1",
        "e2": "1",
    }
    if "kink_amplitudes" in fit:  # reconstruct(kink_modes > 0): the straight fit beside the bent one
        units.update(
            {
                "straight_vertex": "m",
                "straight_direction": "1",
                "straight_energy": "MeV",
                "straight_t0": "ns",
                "straight_nll": "1",
                "straight_cov": "local",
                "kink_amplitudes": "1",
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".h5.tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("reco")
            for k, u in units.items():
                ds = g.create_dataset(k, data=fit[k].detach().cpu().numpy())
                ds.attrs["unit"] = u
            g.attrs["status_bits"] = json.dumps(STATUS)
            g.attrs["cov_coordinates"] = "vx, vy, vz [m], a, b [rad] along e1, e2, log(E/MeV), t0 [ns]"
            g.attrs["meta"] = json.dumps(meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plots(res: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res["mask"].cpu().numpy()
    fig, ax = plt.subplots(2, 3, figsize=(12, 7))
    for i, n in enumerate("xyz"):
        ax[0, i].hist(res["dv"][:, i].cpu().numpy()[m], bins=30)
        ax[0, i].set_xlabel(f"{n}_fit - {n}_true [m]")
    ax[1, 0].hist(res["angle"].cpu().numpy()[m] * 180 / math.pi, bins=30)
    ax[1, 0].set_xlabel("direction error [deg]")
    ax[1, 1].hist(res["de_frac"].cpu().numpy()[m], bins=30)
    ax[1, 1].set_xlabel("E_fit / E_true - 1")
    p = res["pulls"][:, :6].cpu().numpy()[m]
    ax[1, 2].boxplot([p[:, i] for i in range(6)], tick_labels=["x", "y", "z", "a", "b", "logE"])
    ax[1, 2].set_ylabel("pull")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from physics.io import read_run

    run = read_run(args.file, run=args.run)
    resp, like, particle = physics_response_for_run(
        run.config,
        detector_table=run.detector,
        sensor_values=run.sensors,
        n_track_nodes=args.track_nodes,
        n_depth_nodes=args.depth_nodes,
        ms_samples=args.ms_samples,
        indirect_trace=args.indirect,
    )
    if particle not in FIT_OK:
        raise ConfigError(
            f"particle in {args.file!r}: {particle!r}; reconstruct fits {list(FIT_OK)} (tracks and EM "
            "cascades; a calibration source has no track to fit)"
        )
    t_start = time.perf_counter()
    fit = reconstruct(
        run.hits,
        run.n_events,
        resp,
        like,
        particle,
        n_starts=args.starts,
        optimiser=args.optimiser,
        max_iter=args.max_iter,
        batch_size=args.batch_size,
        dtype=torch.float32 if args.float32 else torch.float64,
        kink_modes=args.kink_modes,
    )
    dt = time.perf_counter() - t_start
    meta = {
        "input": str(args.file),
        "run": run.name,
        "optimiser": args.optimiser,
        "starts": args.starts,
        "kink_modes": args.kink_modes,
        "seconds": dt,
        "particle": particle,
    }
    _write_h5(Path(args.output), fit, meta, args.overwrite)
    st = fit["status"]
    n_ok = int(fit["ok"].sum())
    print(
        f"reconstructed {run.n_events} events in {dt:.1f} s ({dt / run.n_events:.2f} s/event): {n_ok} ok, "
        + ", ".join(f"{k} {int(((st & b) > 0).sum())}" for k, b in STATUS.items() if k != "converged")
        + f" -> {args.output}"
    )
    truth = run.truth
    if all(k in truth for k in ("vertex", "direction", "energy")):
        res = resolutions(fit, {k: torch.as_tensor(truth[k]) for k in ("vertex", "direction", "energy")})
        s = res["summary"]
        print(
            f"resolution (68%, {s['n_ok']} ok fits): vertex {100 * s['vertex_68_m']:.1f} cm, direction "
            f"{s['angle_68_deg']:.2f} deg, energy {100 * s['energy_68_frac']:.1f}%"
        )
        if s["n_end_at_wall"]:
            print(
                f"{s['n_end_at_wall']} ok fits end at the wall (energy a lower limit); energy 68% of the "
                f"other {s['n_ok'] - s['n_end_at_wall']}: {100 * s['energy_68_frac_not_at_wall']:.1f}%"
            )
        print("pull std: " + ", ".join(f"{k} {v:.2f}" for k, v in s["pull_std"].items()))
        if args.png:
            _plots(res, args.png)
            print(f"residual plots -> {args.png}")
    return 0


def add_reconstruct_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``photonfit reconstruct events.h5 -o reco.h5``."""
    r = subparsers.add_parser("reconstruct", help="maximum-likelihood fit of vertex, direction, energy, t0")
    r.add_argument("file", help="run file from photonfit simulate")
    r.add_argument("-o", "--output", default="reco.h5", help="output HDF5 (written atomically)")
    r.add_argument("--run", default=None)
    r.add_argument("--optimiser", default="bfgs", choices=list(OPTIMISERS))
    r.add_argument("--starts", type=int, default=2, help="start points per event (1-4)")
    r.add_argument("--max-iter", type=int, default=60)
    r.add_argument("--batch-size", type=int, default=8, help="events fitted together")
    r.add_argument("--track-nodes", type=int, default=32, help="track quadrature cells of the expected model")
    r.add_argument("--depth-nodes", type=int, default=24, help="cascade depth cells (e-, e+, gamma runs)")
    r.add_argument(
        "--ms-samples",
        type=int,
        default=0,
        help="muons: sampled multiple-scattering kink sets for over-dispersed (negative-binomial) counts "
        "(0: Poisson; 16 calibrates the log E pull width at 0.9-1.45x the fit time)",
    )
    r.add_argument(
        "--kink-modes",
        type=int,
        default=0,
        help="muons and pions: refine each straight fit as a bent track with this many multiple-scattering "
        "kink modes per transverse axis as nuisance parameters (0: off; 6: WCTE 500 MeV mu- vertex 68 %% "
        "7.8 -> 3.9 cm, angle 17 -> 12 mrad, energy 2.1 -> 2.4 %%, 3.7x the fit time; the straight fit is "
        "kept as straight_*)",
    )
    r.add_argument(
        "--indirect",
        type=int,
        default=0,
        metavar="N_TRACE",
        help="model the scattered and reflected light with N_TRACE traced photons per event, held as a "
        "per-PMT template during the fit (0: direct light only; WCTE closure with 1000: 4.7-5.9 s/event)",
    )
    r.add_argument(
        "--float32",
        action="store_true",
        help="optimise and take the Hessian in float32 (sigmas within 0.3 %% of float64; the reported NLL "
        "stays float64)",
    )
    r.add_argument("--png", default=None, help="write residual/pull plots to this PNG (needs truth)")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=_cmd_reconstruct)
    return r
