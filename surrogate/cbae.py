"""Constrained bottleneck autoencoder (CBAE) for PMT waveforms.

After C. Jesús-Valls et al., "Data-driven detector signal
characterization with constrained bottleneck autoencoders", JINST 17 (2022) P06028, arXiv:2203.04604:
an autoencoder whose bottleneck is split into *constrained* units tied to the physical parameters of the
signal (here charge [p.e.] and arrival time [ns]; supervised wherever labels exist) and a few *free* units
(controlled by an L2 penalty). Trained on noisy waveforms (reconstruction target = the noisy input), the
decoder learns E[waveform | parameters], i.e. the detector response, without any pulse shape built in.

Architecture (no pulse shape anywhere; both halves generic MLPs with SiLU):

* encoder ``aligned`` (default): the baseline-subtracted waveform is shifted so that its 3-tap-smoothed
  maximum sits at sample ``align_pos`` and divided by its RMS amplitude a; the MLP sees [shifted/a, log a,
  coarse time] and returns the charge, the time *residual* to the coarse time, log-variances and free units.
  (Peak alignment removes the translation an MLP otherwise learns slowly; ``mlp`` = raw waveform input.)
  ``aligned_raw`` (configs/train/cbae.yaml): the same plus the un-shifted waveform / a and a noise-level
  feature (log RMS of the first quarter), time residual output in sample periods: nothing is lost when the
  maximum is a noise peak, and the uncertainty head sees the noise level.
* decoder ``shift``: x_k = g(t_k - t, q, free) with one small MLP g evaluated at every sample
  time t_k: a learned response that is time-translation equivariant, as the physics is, but whose shape
  is learned from the data; ``shift_linear`` (configs/train/cbae.yaml): x_k = (q / std_q) g((t_k - t) /
  4 dt, q, free), the response per unit charge (g may still depend on q: no linearity imposed), which
  keeps the relative accuracy charge independent; ``mlp`` = one MLP from the latent to all S samples.

One network, three uses:

* ``estimate(adc) -> (params, sigma)``: encoder = parameter estimator with Gaussian uncertainty heads;
* ``expect(params) -> waveform``: decoder = learned electronics response (differentiable in params);
* ``denoise(adc)``: encoder then decoder.

Waveforms are in ADC counts (N, S) sampled at ``sample_times`` [ns] (relative to the channel trigger);
params (N, 2) = [charge p.e., time ns]. Normalisations (baseline/scale of waveforms; mean/std of params)
are buffers of the model, so a checkpoint is self-contained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from physics.config import ConfigError

PARAM_NAMES = ("charge", "time")
PARAM_UNITS = ("p.e.", "ns")
FORMAT = "photonfit-cbae"
FORMAT_VERSION = 1
LOGVAR_MIN, LOGVAR_MAX = -20.0, 4.0
ENCODERS = ("aligned", "aligned_raw", "mlp")
DECODERS = ("shift", "shift_linear", "mlp")


def mlp(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Sequential:
    """Fully connected net n_in -> hidden... -> n_out with SiLU activations (linear output)."""
    layers: list[nn.Module] = []
    last = n_in
    for h in hidden:
        layers += [nn.Linear(last, int(h)), nn.SiLU()]
        last = int(h)
    layers.append(nn.Linear(last, n_out))
    return nn.Sequential(*layers)


class CBAE(nn.Module):
    """Encoder (S -> 2 means + 2 log-variances + F free) and decoder (2 + F -> S), both MLPs.

    Args: n_samples S; sample_times (S,) [ns]; enc_hidden/dec_hidden widths; n_free F; wf_offset [ADC]
    and wf_scale [ADC] (input/output normalisation); param_mean/param_std (2,) in physical units;
    electronics: the electronics config (dict) the model was trained for (metadata only).
    """

    def __init__(
        self,
        n_samples: int,
        sample_times: Sequence[float] | Tensor | None = None,
        enc_hidden: Sequence[int] = (128, 128, 128),
        dec_hidden: Sequence[int] = (256, 256, 256),
        n_free: int = 1,
        wf_offset: float = 0.0,
        wf_scale: float = 1.0,
        param_mean: Sequence[float] = (0.0, 0.0),
        param_std: Sequence[float] = (1.0, 1.0),
        electronics: Mapping[str, Any] | None = None,
        encoder: str = "aligned",
        decoder: str = "shift",
        align_pos: int | None = None,
    ):
        super().__init__()
        if int(n_samples) < 2:
            raise ConfigError(f"cbae.n_samples: got {n_samples!r}, allowed: >= 2")
        if int(n_free) < 0:
            raise ConfigError(f"cbae.n_free: got {n_free!r}, allowed: >= 0")
        if not float(wf_scale) > 0 or any(not float(s) > 0 for s in param_std):
            raise ConfigError(
                f"cbae normalisation: wf_scale={wf_scale!r}, param_std={list(param_std)!r}; allowed: > 0"
            )
        self.n_samples, self.n_free, self.n_params = int(n_samples), int(n_free), len(PARAM_NAMES)
        self.enc_hidden, self.dec_hidden = [int(h) for h in enc_hidden], [int(h) for h in dec_hidden]
        self.electronics = dict(electronics or {})
        if encoder not in ENCODERS:
            raise ConfigError(f"cbae.encoder: got {encoder!r}, allowed: {list(ENCODERS)}")
        if decoder not in DECODERS:
            raise ConfigError(f"cbae.decoder: got {decoder!r}, allowed: {list(DECODERS)}")
        self.encoder_kind, self.decoder_kind = encoder, decoder
        self.align_pos = self.n_samples // 4 if align_pos is None else int(align_pos)
        n_in = {"aligned": self.n_samples + 2, "aligned_raw": 2 * self.n_samples + 3}.get(
            encoder, self.n_samples
        )
        self.encoder = mlp(n_in, self.enc_hidden, self.n_params + self.n_free)
        # separate variance head: the Gaussian-NLL gradients never reach the mean network
        var_hidden = [self.enc_hidden[-1] // 4] if encoder != "aligned_raw" else [64, 64]
        self.var_head = mlp(n_in, var_hidden, self.n_params)
        if decoder in ("shift", "shift_linear"):
            self.decoder = mlp(1 + self.n_params - 1 + self.n_free, self.dec_hidden, 1)
        else:
            self.decoder = mlp(self.n_params + self.n_free, self.dec_hidden, self.n_samples)
        st = (
            torch.arange(self.n_samples, dtype=torch.float32)
            if sample_times is None
            else torch.as_tensor(sample_times, dtype=torch.float32)
        )
        if st.shape != (self.n_samples,):
            raise ConfigError(f"cbae.sample_times: shape {tuple(st.shape)}, expected ({self.n_samples},)")
        self.register_buffer("sample_times", st)
        self.register_buffer("wf_offset", torch.tensor(float(wf_offset)))
        self.register_buffer("wf_scale", torch.tensor(float(wf_scale)))
        self.register_buffer("param_mean", torch.as_tensor(param_mean, dtype=torch.float32).clone())
        self.register_buffer("param_std", torch.as_tensor(param_std, dtype=torch.float32).clone())

    # -- hyper-parameters (what a checkpoint needs to rebuild the module)
    def hparams(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "enc_hidden": self.enc_hidden,
            "dec_hidden": self.dec_hidden,
            "n_free": self.n_free,
            "electronics": self.electronics,
            "encoder": self.encoder_kind,
            "decoder": self.decoder_kind,
            "align_pos": self.align_pos,
        }

    # -- normalisation helpers
    def _check_wf(self, adc: Tensor) -> Tensor:
        if adc.dim() != 2 or adc.shape[1] != self.n_samples:
            raise ConfigError(f"cbae: waveforms of shape {tuple(adc.shape)}, expected (N, {self.n_samples})")
        return adc

    def normalise_params(self, params: Tensor) -> Tensor:
        return (params - self.param_mean.to(params)) / self.param_std.to(params)

    def physical_params(self, z: Tensor) -> Tensor:
        return z * self.param_std.to(z) + self.param_mean.to(z)

    # -- the two halves
    def encode(self, adc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """adc (N,S) [ADC] -> (mean (N,2), log-variance (N,2), free (N,F)), all in normalised units."""
        x = (self._check_wf(adc).to(self.wf_scale.dtype) - self.wf_offset) / self.wf_scale
        p = self.n_params
        if self.encoder_kind in ("aligned", "aligned_raw"):
            feats, t_coarse = self._aligned(x)
            h = self.encoder(feats)
            # aligned_raw: time residual in units of one sample period (sub-sample regression at O(1))
            unit = self._dt() / self.param_std[1].to(x) if self.encoder_kind == "aligned_raw" else 1.0
            mu = torch.cat([h[:, :1], unit * h[:, 1:2] + t_coarse[:, None]], 1)
        else:
            feats = x
            h = self.encoder(x)
            mu = h[:, :p]
        logvar = self.var_head(feats).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return mu, logvar, h[:, p:]

    def _aligned(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shape-agnostic pre-alignment: shift the waveform so its (3-tap smoothed) maximum sits at sample
        ``align_pos`` (zero padding = baseline), divide by its RMS amplitude a; features = [shifted / a,
        log a, coarse time]; coarse time = normalised sample time of the maximum (the encoder regresses
        the residual). Returns (features (N, S+2), coarse normalised time (N,))."""
        S = self.n_samples
        with torch.no_grad():
            sm = x.clone()
            sm[:, 1:-1] = 0.5 * x[:, 1:-1] + 0.25 * (x[:, :-2] + x[:, 2:])
            k = sm.argmax(1)
        xp = torch.nn.functional.pad(x, (S, S))
        idx = k[:, None] + (S - self.align_pos) + torch.arange(S, device=x.device)[None, :]
        xa = xp.gather(1, idx)
        a = xa.pow(2).mean(1, keepdim=True).sqrt() + 0.05
        tk = (self.sample_times.to(x)[k] - self.param_mean[1].to(x)) / self.param_std[1].to(x)
        if self.encoder_kind == "aligned_raw":
            # also the un-shifted waveform (nothing is lost when the maximum is a noise peak) and the
            # log RMS of its first quarter (a noise-level estimate for the uncertainty head)
            nb = torch.log(x[:, : max(S // 4, 2)].std(1, keepdim=True) + 1e-3)
            return torch.cat([xa / a, x / a, torch.log(a), tk[:, None], nb], 1), tk
        return torch.cat([xa / a, torch.log(a), tk[:, None]], 1), tk

    def _dt(self) -> Tensor:
        """Sampling period [ns] (mean spacing of ``sample_times``)."""
        st = self.sample_times
        return (st[-1] - st[0]) / max(self.n_samples - 1, 1)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (N, 2+F) (normalised params then free units) -> clean waveform (N,S) [ADC]."""
        if z.dim() != 2 or z.shape[1] != self.n_params + self.n_free:
            raise ConfigError(
                f"cbae.decode: latent of shape {tuple(z.shape)}, expected (N, {self.n_params + self.n_free})"
            )
        if self.decoder_kind in ("shift", "shift_linear"):
            # translation equivariant: one MLP g(s, q, free) at every sample, s = (t_k - t)/std_t
            # (shift_linear: s = (t_k - t) / (4 sample periods) and output (q / std_q) g(s, q, free):
            # the response is parametrised per unit charge, so its relative accuracy is charge independent;
            # g still depends on q, so no linearity is imposed)
            t = z[:, 1:2] * self.param_std[1].to(z) + self.param_mean[1].to(z)
            lin = self.decoder_kind == "shift_linear"
            s_unit = 4.0 * self._dt().to(z) if lin else self.param_std[1].to(z)
            s = (self.sample_times.to(z)[None, :] - t) / s_unit
            rest = torch.cat([z[:, :1], z[:, 2:]], 1)
            inp = torch.cat([s[:, :, None], rest[:, None, :].expand(-1, self.n_samples, -1)], 2)
            out = self.decoder(inp)[..., 0]
            if lin:
                q = z[:, :1] + self.param_mean[0].to(z) / self.param_std[0].to(z)  # = q / std_q
                out = q * out
        else:
            out = self.decoder(z)
        return out * self.wf_scale.to(z) + self.wf_offset.to(z)

    def forward(self, adc: Tensor) -> Tensor:
        return self.denoise(adc)

    # -- public faces
    def expect(self, params: Tensor, free: Tensor | None = None) -> Tensor:
        """Learned detector response: params (N,2) [charge p.e., time ns] -> expected waveform (N,S) [ADC].

        Free units default to 0 (their trained prior mean). Differentiable in params (any float dtype).
        """
        if params.dim() != 2 or params.shape[1] != self.n_params:
            raise ConfigError(
                f"cbae.expect: params of shape {tuple(params.shape)}, expected (N, {self.n_params})"
            )
        if free is None:
            free = params.new_zeros(params.shape[0], self.n_free)
        return self.decode(torch.cat([self.normalise_params(params), free.to(params)], 1))

    def expect_channels(
        self, channel: Tensor, t: Tensor, charge: Tensor, n_channels: int, t_start: Tensor | None = None
    ) -> Tensor:
        """Electronics-stage interface (as ``physics.electronics.Electronics.expect``): (C,S) [ADC].

        Sums the decoder's single-pulse responses (baseline removed) per channel: assumes the response
        is linear in superposed p.e. (valid below saturation). channel (N,) long; t (N,) ns; charge (N,).
        """
        dtype = t.dtype
        if t_start is None:
            t_start = torch.zeros(int(n_channels), dtype=dtype, device=t.device)
        rel = t - torch.as_tensor(t_start, dtype=dtype, device=t.device)[channel]
        wf = self.expect(torch.stack([charge.to(dtype), rel], 1)) - self.wf_offset.to(dtype)
        out = self.wf_offset.to(dtype).expand(int(n_channels), self.n_samples).clone()
        return out.index_add(0, channel.long(), wf)

    def estimate(self, adc: Tensor) -> tuple[Tensor, Tensor]:
        """Waveforms (N,S) [ADC] -> (params (N,2) [p.e., ns], sigma (N,2) same units) from the encoder."""
        mu, logvar, _ = self.encode(adc)
        return self.physical_params(mu), torch.exp(0.5 * logvar) * self.param_std.to(mu)

    def denoise(self, adc: Tensor) -> Tensor:
        """Encode then decode: (N,S) [ADC] -> (N,S) clean-waveform estimate [ADC]."""
        mu, _, free = self.encode(adc)
        return self.decode(torch.cat([mu, free], 1))

    def param_bounds(self) -> Tensor:
        """Valid parameter box (2,2) [[q_lo, q_hi], [t_lo, t_hi]] [p.e., ns] used to clamp ``refine``: the
        training ranges (checkpoint metadata ``config.data.charge_range/time_range``) widened by 10% of
        their width on each side (charge >= 0); without metadata param_mean +- 3 param_std."""
        data = (getattr(self, "metadata", None) or {}).get("config", {}).get("data", {})
        rows = []
        for i, key in enumerate(("charge_range", "time_range")):
            if key in data:
                lo, hi = (float(v) for v in data[key])
                w = hi - lo
                lo, hi = lo - 0.1 * w, hi + 0.1 * w
            else:
                m, sd = float(self.param_mean[i]), float(self.param_std[i])
                lo, hi = m - 3 * sd, m + 3 * sd
            rows.append([max(lo, 0.0) if i == 0 else lo, hi])
        return torch.tensor(rows, dtype=self.param_mean.dtype, device=self.param_mean.device)

    def refine(
        self,
        adc: Tensor,
        params: Tensor | None = None,
        n_iter: int = 6,
        noise_sigma: float | Tensor | None = None,
        noise_cov: Tensor | None = None,
        fit_free: bool = False,
        bounds: Tensor | None = None,
        damping: float = 1e-3,
        free: Tensor | None = None,
        scan_step: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Analysis by synthesis with the LEARNED decoder: per waveform, minimise the (optionally
        noise-whitened) least squares chi^2(q, t) = sum_k (x_k - decoder(q, t, free)_k)^2 / sigma^2
        (or r^T C^-1 r with the noise covariance C) by damped Gauss-Newton = Levenberg-Marquardt
        (K. Levenberg, Q. Appl. Math. 2 (1944) 164; D. W. Marquardt, SIAM J. Appl. Math. 11 (1963) 431),
        batched over waveforms. No pulse shape is assumed: the model of the waveform is the decoder.

        Start: ``params`` (N,2) [p.e., ns] if given, else the encoder estimate; free units start at
        ``free`` (N,F) if given, else the encoder's free output, and stay fixed unless ``fit_free``
        (then they are fitted too: 2+F parameters; degenerate with the charge, not recommended).
        Each iteration: Jacobian J = d decoder / d latent by forward-mode autograd
        (``torch.func.jvp``, one tangent per parameter, all in one batched call), step
        delta = (J^T J + lambda diag(J^T J))^-1 J^T r solved batched, parameters clamped to ``bounds``
        (2,2) [[q_lo,q_hi],[t_lo,t_hi]] (default :meth:`param_bounds`), step kept only where chi^2 fell
        (lambda /3 on success, x10 on failure, per waveform).

        ``scan_step`` [ns] (optional): before the LM, a global start search through the decoder (the LM
        alone is local and inherits an encoder start that a noise peak misled): on a time grid of that
        step over the bounds, the response e_j = decoder(q_s, t_j, free) - baseline at the start charge
        q_s (>= 1 p.e.) gives the profiled chi^2 of the best scaled copy alpha e_j
        (alpha = <x, e_j>/<e_j, e_j>, charge alpha q_s clamped to the bounds); the grid minimum replaces
        the start where its chi^2 is lower than the start's. Loops over grid chunks (vectorised over
        waveforms).

        Uncertainty (N,2) [p.e., ns]: sqrt(diag((J^T C^-1 J)^-1)) at the solution (Cramer-Rao / Gauss-
        Newton covariance) with C = noise_cov (S,S) [ADC^2], or sigma^2 I for ``noise_sigma`` [ADC]
        (scalar or (N,)); with neither, sigma^2 is estimated per waveform as chi^2_min / (S - n_par).
        Marginal over the free units when ``fit_free``. Works in the model's dtype/device (adc is moved
        there); returns (params (N,2), sigma (N,2)) on adc's device, in adc's float dtype (model's dtype
        for integer ADC). No gradient is tracked (estimation tool, not a differentiable layer). Same result
        inside and outside ``torch.inference_mode()`` (the Jacobian is always computed outside it).
        """
        from torch.func import jvp

        if torch.is_inference_mode_enabled():
            # forward-mode AD (jvp) does not run under inference mode on every torch >= 2.4 (on 2.11 it
            # silently gave zero tangents, i.e. no step): leave it, with normal (non-inference) copies
            def plain(v: Any) -> Any:
                return v.clone() if isinstance(v, Tensor) else v

            with torch.inference_mode(False):
                return self.refine(
                    plain(adc),
                    plain(params),
                    n_iter=n_iter,
                    noise_sigma=plain(noise_sigma),
                    noise_cov=plain(noise_cov),
                    fit_free=fit_free,
                    bounds=plain(bounds),
                    damping=damping,
                    free=plain(free),
                    scan_step=scan_step,
                )
        x_in = self._check_wf(adc)
        if int(n_iter) < 0:
            raise ConfigError(f"cbae.refine.n_iter: got {n_iter!r}, allowed: >= 0")
        if not float(damping) > 0:
            raise ConfigError(f"cbae.refine.damping: got {damping!r}, allowed: > 0")
        if noise_sigma is not None and noise_cov is not None:
            raise ConfigError("cbae.refine: give noise_sigma or noise_cov, not both")
        ref = self.wf_scale
        out_dtype = adc.dtype if adc.is_floating_point() else ref.dtype
        N, S = x_in.shape
        with torch.no_grad():
            x = x_in.to(ref)
            mu, _, free_ = self.encode(x)
            if params is not None:
                if params.shape != (N, self.n_params):
                    raise ConfigError(
                        f"cbae.refine.params: shape {tuple(params.shape)}, expected ({N}, {self.n_params})"
                    )
                mu = self.normalise_params(params.to(ref))
            if free is not None:
                if free.shape != (N, self.n_free):
                    raise ConfigError(
                        f"cbae.refine.free: shape {tuple(free.shape)}, expected ({N}, {self.n_free})"
                    )
                free_ = free.to(ref)
            z = torch.cat([mu, free_], 1)
            n_fit = self.n_params + (self.n_free if fit_free else 0)
            b = (self.param_bounds() if bounds is None else torch.as_tensor(bounds)).to(ref)
            if b.shape != (2, 2) or not bool((b[:, 1] > b[:, 0]).all()):
                raise ConfigError(f"cbae.refine.bounds: got {b.tolist()}, allowed: (2,2) with lo < hi")
            zlo = (b[:, 0] - self.param_mean) / self.param_std
            zhi = (b[:, 1] - self.param_mean) / self.param_std
            if noise_cov is not None:
                cov = torch.as_tensor(noise_cov).to(ref)
                if cov.shape != (S, S):
                    raise ConfigError(f"cbae.refine.noise_cov: shape {tuple(cov.shape)}, expected ({S}, {S})")
                L = torch.linalg.cholesky(cov)
                white = lambda v: torch.linalg.solve_triangular(L, v, upper=False)  # noqa: E731
            elif noise_sigma is not None:
                sig = torch.as_tensor(noise_sigma).to(ref).reshape(-1, 1, 1)
                if not bool((sig > 0).all()) or sig.shape[0] not in (1, N):
                    raise ConfigError(
                        f"cbae.refine.noise_sigma: got {noise_sigma!r}, allowed: > 0, scalar or (N,)"
                    )
                white = lambda v: v / sig  # noqa: E731
            else:
                white = lambda v: v  # noqa: E731
            eye = torch.eye(n_fit, dtype=ref.dtype, device=ref.device)
            tang = eye.repeat_interleave(N, 0)  # (n_fit*N, n_fit): parameter j for block j
            tang = torch.cat([tang, tang.new_zeros(n_fit * N, z.shape[1] - n_fit)], 1)

            def clamp(zz: Tensor) -> Tensor:
                return torch.cat([torch.maximum(torch.minimum(zz[:, :2], zhi), zlo), zz[:, 2:]], 1)

            def residual_jacobian(zz: Tensor) -> tuple[Tensor, Tensor]:
                f, df = jvp(self.decode, (zz.repeat(n_fit, 1),), (tang,))
                r = (x - f[:N])[..., None]  # (N,S,1)
                J = df.reshape(n_fit, N, S).permute(1, 2, 0)  # (N,S,n_fit)
                return white(r)[..., 0], white(J)

            def chi2(zz: Tensor) -> Tensor:
                return white((x - self.decode(zz))[..., None])[..., 0].pow(2).sum(1)

            z = clamp(z)
            cost = chi2(z)
            if scan_step is not None:
                z, cost = self._scan_start(x, z, cost, b, float(scan_step), white)
            lam = torch.full((N,), float(damping), dtype=ref.dtype, device=ref.device)
            for _ in range(int(n_iter)):
                r, J = residual_jacobian(z)
                A = J.transpose(1, 2) @ J
                g = (J.transpose(1, 2) @ r[..., None])[..., 0]
                dA = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
                step = torch.linalg.solve(A + torch.diag_embed(lam[:, None] * dA), g)
                z_new = z.clone()
                z_new[:, :n_fit] = z[:, :n_fit] + step
                z_new = clamp(z_new)
                c_new = chi2(z_new)
                ok = torch.isfinite(c_new) & (c_new <= cost)
                z = torch.where(ok[:, None], z_new, z)
                cost = torch.where(ok, c_new, cost)
                lam = torch.where(ok, lam / 3, lam * 10).clamp(1e-9, 1e9)
            r, J = residual_jacobian(z)
            A = J.transpose(1, 2) @ J
            A = A + torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-30) * 1e-9)
            var = torch.diagonal(torch.linalg.inv(A), dim1=1, dim2=2)[:, :2]  # normalised units
            if noise_sigma is None and noise_cov is None:
                var = var * (r.pow(2).sum(1) / max(S - n_fit, 1))[:, None]
            sigma = var.clamp_min(0).sqrt() * self.param_std
            p = self.physical_params(z[:, :2])
        return p.to(adc.device, out_dtype), sigma.to(adc.device, out_dtype)

    def _scan_start(
        self, x: Tensor, z: Tensor, cost: Tensor, b: Tensor, step: float, white: Any
    ) -> tuple[Tensor, Tensor]:
        """Grid search of the start time (see :meth:`refine`, ``scan_step``); returns (z, chi^2) (N,)."""
        if not step > 0:
            raise ConfigError(f"cbae.refine.scan_step: got {step!r}, allowed: > 0 ns")
        N, S = x.shape
        tg = torch.arange(float(b[1, 0]), float(b[1, 1]) + 1e-9, step, dtype=x.dtype, device=x.device)
        q_s = self.physical_params(z[:, :2])[:, 0].clamp_min(max(float(b[0, 0]), 1.0))
        y = x - self.wf_offset
        width = max([*self.dec_hidden, 1])
        chunk = max(1, int(2e7 // max(N * S * width, 1)))
        best_c, best_t, best_q = cost.clone(), z.new_full((N,), float("nan")), z.new_zeros(N)
        for j0 in range(0, tg.numel(), chunk):
            t = tg[j0 : j0 + chunk]  # (G,)
            G = t.numel()
            p = torch.stack([q_s[:, None].expand(N, G), t[None, :].expand(N, G)], 2).reshape(N * G, 2)
            zz = torch.cat([self.normalise_params(p), z[:, 2:].repeat_interleave(G, 0)], 1)
            e = (self.decode(zz) - self.wf_offset).reshape(N, G, S)
            alpha = (e * y[:, None, :]).sum(2) / e.pow(2).sum(2).clamp_min(1e-12)  # (N, G)
            q = (alpha * q_s[:, None]).clamp(float(b[0, 0]), float(b[0, 1]))
            r = y[:, None, :] - (q / q_s[:, None])[..., None] * e  # (N, G, S)
            c = white(r.transpose(1, 2)).pow(2).sum(1)  # (N, G)
            cmin, k = c.min(1)
            better = cmin < best_c
            best_c = torch.where(better, cmin, best_c)
            best_t = torch.where(better, t[k], best_t)
            best_q = torch.where(better, q.gather(1, k[:, None])[:, 0], best_q)
        take = torch.isfinite(best_t)
        if bool(take.any()):
            zn = self.normalise_params(torch.stack([best_q, best_t.nan_to_num(0.0)], 1))
            z = torch.where(take[:, None], torch.cat([zn, z[:, 2:]], 1), z)
            # exact chi^2 at the new start (the grid value used the scaled-copy approximation)
            new_cost = white((x - self.decode(z))[..., None])[..., 0].pow(2).sum(1)
            cost = torch.where(take, new_cost, cost)
        return z, cost


# --------------------------------------------------------------------------------------------- checkpoints
def save_cbae(model: CBAE, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``{format, format_version, hparams, state_dict, metadata}`` atomically (tmp + os.replace)."""
    from physics import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "hparams": model.hparams(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": json.loads(json.dumps(dict(metadata or {}), default=str)),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_cbae(
    path: str | os.PathLike, n_samples: int | None = None, map_location: str | torch.device = "cpu"
) -> CBAE:
    """Load a CBAE saved by :func:`save_cbae` (eval mode). ConfigError for a missing file, another
    format or format version, a state dict that does not fit the declared architecture, or a model whose
    waveform length differs from ``n_samples`` (when given)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cbae checkpoint: {str(p)!r} does not exist")
    try:
        blob = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means "not our checkpoint"
        raise ConfigError(f"cbae checkpoint {str(p)!r}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(
            f"cbae checkpoint {str(p)!r}: format {blob.get('format') if isinstance(blob, dict) else None!r},"
            f" expected {FORMAT!r}"
        )
    if blob.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"cbae checkpoint {str(p)!r}: format_version {blob.get('format_version')!r}, "
            f"this photonfit reads version {FORMAT_VERSION}"
        )
    hp = blob["hparams"]
    if n_samples is not None and int(hp["n_samples"]) != int(n_samples):
        raise ConfigError(
            f"cbae checkpoint {str(p)!r}: n_samples {hp['n_samples']}, expected {n_samples} "
            "(waveform length of the data)"
        )
    model = CBAE(**hp)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(
            f"cbae checkpoint {str(p)!r}: weights do not match the declared architecture "
            f"{hp} ({str(exc).splitlines()[0]})"
        ) from exc
    model.metadata = blob.get("metadata", {})
    return model.eval()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata file beside a checkpoint (``<name>.json``), or {} if absent."""
    j = Path(path).with_suffix(".json")
    return json.loads(j.read_text()) if j.is_file() else {}


def gaussian_nll(mu: Tensor, logvar: Tensor, target: Tensor) -> Tensor:
    """Per-element Gaussian negative log-likelihood 0.5 (log var + (y - mu)^2 / var + log 2 pi)."""
    return 0.5 * (logvar + (target - mu) ** 2 * torch.exp(-logvar) + math.log(2 * math.pi))
