"""LightningModule for the constrained bottleneck autoencoder (arXiv:2203.04604).

Loss per batch (waveforms normalised by the model's wf_scale, params by param_mean/std):

* recon   : mean over samples of (decode(mu, free) - target)^2, target = the noisy input (the paper's
            unsupervised objective; ``recon_target: clean`` uses simulation truth instead, off by default);
* label   : on labelled waveforms only (masked per sample): (mu - y)^2 + Gaussian NLL of y given
            (mu detached, log-variance head), so the constrained units are the physical parameters and the
            variance head learns the per-waveform uncertainty;
* teacher : on labelled waveforms, decode(y, free=0) vs the target: the decoder as a response model
            params -> E[waveform] (what ``CBAE.expect`` uses);
* free_l2 : mean free-unit activation squared (controlled use of the free latent units).
``label_beta`` (default 1 = plain squared error) weights the mean part of the label term per parameter by
stopgrad(var)^(beta - 1) (normalised to unit batch mean), the gradient of the beta-NLL of M. Seitzer et
al., "On the pitfalls of heteroscedastic uncertainty estimation with probabilistic neural networks",
ICLR 2022 (arXiv:2203.09168): beta = 0.5 weights each waveform by 1/sigma, so precisely measurable pulses
(large charge, low noise) are not drowned by the squared errors of barely visible ones.
``recon_weight: profile`` weights the two decoder terms per waveform by stopgrad(1 / its mean squared
residual) (:func:`profile_mse`), the gradient of the Gaussian likelihood with an unknown noise variance
per waveform profiled out: with noise levels spread over a decade, the decoder is fitted to the quiet
waveforms' precision instead of the noisy ones' scatter (``uniform``, the default, is the plain MSE).
``decoder_batch`` > 0 evaluates the two decoder terms on that many waveforms of each training batch (CPU
cost; the encoder's label term always uses the whole batch).

``optim.ema_decay`` d > 0 keeps an exponential moving average of the weights, w_ema <- d w_ema + (1 - d) w
after every optimiser step (Polyak & Juditsky, SIAM J. Control Optim. 30 (1992) 838, in its exponential
form): validation, checkpoint selection and the exported model use the averaged weights, which removes
most of the SGD noise that sets the encoder's precision floor on bright, quiet pulses. 0 (default): off.

``optim.var_refit_epochs`` k > 0: after training, the variance head of the exported weights is refitted for
k epochs on the labelled training waveforms by the Gaussian NLL about the *exported* means, every other
weight frozen (:meth:`CBAEModule.refit_variance`). During training the head learns the scatter of the
raw weights' estimates; the moving average scatters less, so without the refit its sigmas come out too
large. 0 (default): off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from physics.config import ConfigError, check_choice, check_keys, check_number
from surrogate.cbae import CBAE, gaussian_nll

LOSS_KEYS = [
    "recon",
    "label",
    "teacher",
    "free_l2",
    "recon_target",
    "decoder_batch",
    "label_beta",
    "recon_weight",
]
OPTIM_KEYS_REQ = ["lr", "max_epochs"]
OPTIM_KEYS_OPT = [
    "weight_decay",
    "patience",
    "max_minutes",
    "min_lr_factor",
    "grad_clip",
    "ema_decay",
    "var_refit_epochs",
]


def profile_mse(pred: Tensor, target: Tensor, weighted: bool, mask: Tensor | None = None) -> Tensor:
    """Mean squared residual of (N, S) waveforms; ``weighted``: each waveform weighted by stopgrad(1/RSS_i)
    normalised to unit batch mean, RSS_i = its mean squared residual. That is the gradient of the profile
    Gaussian likelihood with an unknown noise variance per waveform, sum_i (S/2) log RSS_i (heteroscedastic
    noise: quiet waveforms are not drowned by noisy ones). ``mask`` (N,) 0/1: only those waveforms."""
    r2 = (pred - target).pow(2).mean(1)
    w = 1.0 / r2.detach().clamp_min(1e-12) if weighted else torch.ones_like(r2)
    if mask is not None:
        w = w * mask.to(w.dtype)
    return (w * r2).sum() / w.sum().clamp_min(1e-12)


def label_weights(logvar: Tensor, labelled: Tensor, beta: float) -> Tensor:
    """beta-NLL weights (N, P) = stopgrad(var)^(beta - 1), var = exp(logvar), normalised per parameter to unit
    mean over the labelled rows (``labelled`` (N,) 0/1); Seitzer et al., ICLR 2022 (arXiv:2203.09168)."""
    w = torch.exp((beta - 1.0) * logvar.detach())
    lab = labelled.to(w.dtype)[:, None]
    return w / ((w * lab).sum(0, keepdim=True) / lab.sum().clamp_min(1.0)).clamp_min(1e-12)


class CBAEModule(L.LightningModule):
    """Wraps a :class:`surrogate.cbae.CBAE`; ``model_cfg`` = architecture, ``norm`` = data normalisation."""

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        norm: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any],
    ):
        super().__init__()
        check_keys(
            model_cfg,
            required=["enc_hidden", "dec_hidden", "n_free"],
            optional=["encoder", "decoder", "align_pos"],
            where="train.model",
        )
        check_keys(loss, required=[], optional=LOSS_KEYS, where="train.loss")
        check_keys(optim, required=OPTIM_KEYS_REQ, optional=OPTIM_KEYS_OPT, where="train.optim")
        self.save_hyperparameters()
        self.w = {
            k: check_number(loss.get(k, d), f"train.loss.{k}", minimum=0.0)
            for k, d in (("recon", 1.0), ("label", 1.0), ("teacher", 1.0), ("free_l2", 0.1))
        }
        self.decoder_batch = check_number(
            loss.get("decoder_batch", 0), "train.loss.decoder_batch", minimum=0, integer=True
        )
        self.label_beta = check_number(
            loss.get("label_beta", 1.0), "train.loss.label_beta", minimum=0.0, maximum=1.0
        )
        self.recon_weight = check_choice(
            loss.get("recon_weight", "uniform"), "train.loss.recon_weight", ["uniform", "profile"]
        )
        self.recon_target = check_choice(
            loss.get("recon_target", "noisy"), "train.loss.recon_target", ["noisy", "clean"]
        )
        self.lr = check_number(optim["lr"], "train.optim.lr", minimum=0.0, strict_min=True)
        self.weight_decay = check_number(
            optim.get("weight_decay", 0.0), "train.optim.weight_decay", minimum=0.0
        )
        self.max_epochs = check_number(optim["max_epochs"], "train.optim.max_epochs", minimum=1, integer=True)
        self.min_lr_factor = check_number(
            optim.get("min_lr_factor", 0.02), "train.optim.min_lr_factor", minimum=0.0, maximum=1.0
        )
        self.ema_decay = check_number(
            optim.get("ema_decay", 0.0), "train.optim.ema_decay", minimum=0.0, maximum=1.0, strict_max=True
        )
        self.var_refit_epochs = check_number(
            optim.get("var_refit_epochs", 0), "train.optim.var_refit_epochs", minimum=0, integer=True
        )
        try:
            self.model = CBAE(**dict(model_cfg), **dict(norm))
        except TypeError as exc:
            raise ConfigError(f"train.model: {exc}") from exc
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay), use_buffers=True)
            if self.ema_decay > 0
            else None
        )

    @property
    def final_model(self) -> CBAE:
        """The weights that are validated and exported: the moving average when ``ema_decay`` > 0."""
        return self.ema.module if self.ema is not None else self.model

    def losses(self, batch: Mapping[str, Tensor], model: CBAE | None = None) -> dict[str, Tensor]:
        m = self.model if model is None else model
        adc, y, lab = batch["adc"], batch["params"], batch["labelled"].to(batch["adc"].dtype)
        target = adc if self.recon_target == "noisy" else batch["clean"]
        mu, logvar, free = m.encode(adc)
        s = m.wf_scale
        yn = m.normalise_params(y)
        n_lab = lab.sum().clamp_min(1.0)
        se = (mu - yn) ** 2
        if self.label_beta < 1.0:
            se = se * label_weights(logvar, lab, self.label_beta)
        per = (se + gaussian_nll(mu.detach(), logvar, yn)).sum(1)
        l_lab = (per * lab).sum() / n_lab
        # decoder terms on the first decoder_batch waveforms only (the decoder is the costly half)
        k = self.decoder_batch if 0 < self.decoder_batch < adc.shape[0] and self.training else adc.shape[0]
        rec = m.decode(torch.cat([mu[:k], free[:k]], 1))
        prof = self.recon_weight == "profile"
        l_rec = profile_mse(rec / s, target[:k] / s, prof)
        if self.w["teacher"] > 0:
            dec = m.decode(torch.cat([yn[:k], yn.new_zeros(k, m.n_free)], 1))
            l_teach = profile_mse(dec / s, target[:k] / s, prof, lab[:k])
        else:
            l_teach = l_rec.new_zeros(())
        l_free = (free**2).mean() if m.n_free else l_rec.new_zeros(())
        total = (
            self.w["recon"] * l_rec
            + self.w["label"] * l_lab
            + self.w["teacher"] * l_teach
            + self.w["free_l2"] * l_free
        )
        out = {"loss": total, "recon": l_rec, "label": l_lab, "teacher": l_teach, "free_l2": l_free}
        with torch.no_grad():
            phys = m.physical_params(mu)
            err = (phys - y)[lab > 0]
            if err.numel():
                out["charge_rms"] = err[:, 0].pow(2).mean().sqrt()
                out["time_rms"] = err[:, 1].pow(2).mean().sqrt()
            out["denoise_rms"] = (rec - batch["clean"][:k]).pow(2).mean().sqrt()
        return out

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        """Losses of one batch, logged per epoch under ``stage``/ (validation ones on the progress bar);
        validation uses :attr:`final_model`."""
        out = self.losses(batch, self.final_model if stage == "val" else None)
        self.log_dict(
            {f"{stage}/{k}": v for k, v in out.items()},
            prog_bar=stage == "val",
            on_step=False,
            on_epoch=True,
            batch_size=batch["adc"].shape[0],
        )
        return out["loss"]

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def refit_variance(self, batches: Any, epochs: int, lr: float = 3e-4) -> float:
        """Refit :attr:`final_model`'s variance head alone (Adam, ``lr``) for ``epochs`` passes over
        ``batches`` (an iterable of training batches): minimise the Gaussian NLL of the labels about the
        model's own (frozen) means, labelled waveforms only. At the optimum the last layer's bias makes the
        mean squared pull over those waveforms exactly 1 per parameter (d NLL / d bias = 0). Returns the
        last epoch's mean NLL."""
        m = self.final_model
        was_training = m.training
        m.eval()
        grads = {p: p.requires_grad for p in m.parameters()}
        head = list(m.var_head.parameters())
        in_head = set(head)
        for p in m.parameters():
            p.requires_grad_(p in in_head)
        opt = torch.optim.Adam(head, lr=lr)
        last = float("nan")
        try:
            for _ in range(int(epochs)):
                tot, n = 0.0, 0.0
                for batch in batches:
                    lab = batch["labelled"].bool()
                    if not bool(lab.any()):
                        continue
                    adc, y = batch["adc"][lab], batch["params"][lab]
                    mu, logvar, _ = m.encode(adc)  # only the variance head requires grad
                    loss = gaussian_nll(mu.detach(), logvar, m.normalise_params(y)).sum(1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    tot, n = tot + float(loss.detach()) * len(y), n + len(y)
                last = tot / max(n, 1.0)
        finally:
            for p, g in grads.items():
                p.requires_grad_(g)
            m.train(was_training)
        return last

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=self.max_epochs, eta_min=self.lr * self.min_lr_factor
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
