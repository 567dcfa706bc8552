"""PMT response: photon detection (QE x collection efficiency x angular acceptance), dark noise and
hit digitisation (single-p.e. charge, transit-time spread, per-PMT time offsets, threshold).

Units: wavelength nm, time ns, dark rate Hz, charge p.e. (1 p.e. = mean single-p.e. charge x gain).

Physics (see configs/sensors/*.yaml for the numbers and their sources):

* Detection probability of a photon absorbed in a photocathode (Fukuda et al., Super-Kamiokande,
  NIM A 501 (2003) 418; the same factorisation is used in WCSim and skdetsim):
  ``p(lambda, cos, i) = QE(lambda) * qe_scale_i * CE * A(cos)``, clipped to [0, 1], with QE(lambda) a
  tabulated bialkali curve (linear interpolation, 0 outside the table), CE the photoelectron collection
  efficiency and A(cos theta) the relative angular acceptance normalised to A(1) = 1.
* Dark noise: thermionic emission is a Poisson process; per event the number of dark p.e. is
  ``Poisson(R_dark * T_window * P)`` with PMT and time uniform.
* Charge: the charge of one p.e. follows the single-p.e. (SPE) distribution (Gaussian truncated at 0, or a
  log-normal), normalised to mean 1 p.e.; a PMT's charge is the sum over its p.e. (compound Poisson:
  for Poisson(mu) p.e. the mean is mu and the variance mu * E[q^2] = mu (1 + s^2), s the relative SPE width).
* Time: each p.e. gets the transit-time spread ``N(0, tts^2)`` and the PMT's time offset; the hit time is the
  earliest p.e. time (a leading-edge discriminator fires on the first p.e.).
* Threshold: hits with total charge below ``threshold_pe`` are removed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from physics.config import ConfigError, check_choice, check_keys, check_number, config_dir, load_yaml
from physics.records import CathodeHits, Hits, PhotoElectrons

SPE_FAMILIES = ("gaussian", "lognormal")
ACCEPTANCE_KINDS = ("polynomial", "table")


# ----------------------------------------------------------------------------------------------------------
# pure kernels
# ----------------------------------------------------------------------------------------------------------


def interp_table(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Linear interpolation of the table (xp (K,) increasing, fp (K,)) at x (any shape); 0 outside [xp0, xpK].

    Differentiable in fp (and piecewise in x)."""
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = (x - x0) / (x1 - x0)
    y = fp[idx - 1] * (1 - w) + fp[idx] * w
    inside = (x >= xp[0]) & (x <= xp[-1])
    return torch.where(inside, y, torch.zeros_like(y))


def angular_acceptance(
    cos_incidence: Tensor, kind: str, coef: Tensor, table_cos: Tensor | None = None
) -> Tensor:
    """Relative angular acceptance A(cos theta), normalised to A(1) = 1, 0 for cos <= 0 (from behind).

    kind 'polynomial': A = sum_k c_k cos^k / sum_k c_k (Horner); kind 'table': linear interpolation of the
    values ``coef`` at ``table_cos`` (increasing, last node 1). Negative values are clipped to 0."""
    c = cos_incidence.clamp(0.0, 1.0)
    coef = coef.to(device=c.device, dtype=c.dtype)
    if kind == "polynomial":
        y = torch.zeros_like(c)
        for ck in coef.flip(0):  # Horner over the (few) polynomial coefficients
            y = y * c + ck
        y = y / coef.sum()
    else:
        y = interp_table(c, table_cos, coef) / coef[-1]
    return torch.where(cos_incidence > 0, y.clamp_min(0.0), torch.zeros_like(y))


def spe_moments(family: str, sigma: float) -> tuple[float, float]:
    """(raw mean, relative variance Var(q)/E[q]^2) of the SPE family before normalisation to mean 1.

    gaussian: N(1, sigma^2) truncated at 0, alpha = -1/sigma, Z = 1 - Phi(alpha),
    mean = 1 + sigma phi(alpha)/Z, var = sigma^2 [1 + alpha phi(alpha)/Z - (phi(alpha)/Z)^2]
    (Johnson, Kotz & Balakrishnan, Continuous Univariate Distributions vol. 1, ch. 13).
    lognormal: mean 1 and relative variance sigma^2 exactly (s^2 = ln(1 + sigma^2), mu = -s^2/2)."""
    if family == "lognormal":
        return 1.0, sigma * sigma
    a = -1.0 / sigma
    phi = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    z = 0.5 * math.erfc(a / math.sqrt(2.0))
    lam = phi / z
    mean = 1.0 + sigma * lam
    var = sigma * sigma * (1.0 + a * lam - lam * lam)
    return mean, var / (mean * mean)


def sample_spe(
    n: int,
    family: str,
    sigma: float,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw n single-p.e. charges (n,) [p.e.], normalised so that the mean is exactly 1 p.e.

    gaussian: inverse-CDF sampling of N(1, sigma^2) truncated at 0, divided by its mean (spe_moments);
    lognormal: exp(mu + s z), s^2 = ln(1 + sigma^2), mu = -s^2/2."""
    if family == "lognormal":
        s2 = math.log1p(sigma * sigma)
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.exp(-0.5 * s2 + math.sqrt(s2) * z)
    mean, _ = spe_moments(family, sigma)
    lo = 0.5 * math.erfc(1.0 / (sigma * math.sqrt(2.0)))  # Phi(-1/sigma)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    u = lo + (1.0 - lo) * u
    u = u.clamp(min=max(lo, 1e-300), max=1.0 - 1e-16)
    q = (1.0 + sigma * torch.special.ndtri(u)).clamp_min(0.0) / mean
    return q.to(dtype)


def first_hit_digitize(
    pmt: Tensor, event: Tensor, t: Tensor, q: Tensor, n_pmts: int, threshold: float
) -> Hits:
    """Group p.e. (N,) by (event, PMT): charge = sum q, time = min t; drop hits with charge < threshold.

    Vectorised with torch.unique + index_add + scatter_reduce('amin'); output sorted by (event, pmt).
    Differentiable in q (sum) and t (min, gradient to the earliest p.e.)."""
    key = event.long() * n_pmts + pmt.long()
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    m = uniq.numel()
    charge = torch.zeros(m, device=q.device, dtype=q.dtype).index_add(0, inv, q)
    time = torch.full((m,), float("inf"), device=t.device, dtype=t.dtype)
    time = time.scatter_reduce(0, inv, t, reduce="amin", include_self=False)
    keep = charge >= threshold
    return Hits(
        pmt=(uniq % n_pmts)[keep],
        charge=charge[keep],
        time=time[keep],
        event=torch.div(uniq, n_pmts, rounding_mode="floor")[keep],
    )


# ----------------------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------------------


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a sensor config mapping and return a normalised copy (raises ConfigError naming the field)."""
    check_keys(
        cfg,
        required=[
            "qe",
            "collection_efficiency",
            "angular_acceptance",
            "spe",
            "tts_ns",
            "dark_rate_hz",
            "threshold_pe",
        ],
        optional=["name"],
        where="sensors",
    )
    out: dict[str, Any] = {"name": str(cfg.get("name", "pmt"))}
    qe = cfg["qe"]
    check_keys(qe, required=["wavelength_nm", "efficiency"], optional=["reference"], where="sensors.qe")
    wl, eff = qe["wavelength_nm"], qe["efficiency"]
    for field, arr in (("sensors.qe.wavelength_nm", wl), ("sensors.qe.efficiency", eff)):
        if not isinstance(arr, list) or len(arr) < 2:
            raise ConfigError(f"{field}: got {arr!r}, expected a list of at least 2 numbers")
    if len(wl) != len(eff):
        raise ConfigError(
            f"sensors.qe.efficiency: got {len(eff)} values for {len(wl)} wavelengths; "
            "allowed: the same length as sensors.qe.wavelength_nm"
        )
    wl = [
        check_number(v, f"sensors.qe.wavelength_nm[{i}]", minimum=0, strict_min=True)
        for i, v in enumerate(wl)
    ]
    eff = [check_number(v, f"sensors.qe.efficiency[{i}]", minimum=0, maximum=1) for i, v in enumerate(eff)]
    if any(b <= a for a, b in zip(wl, wl[1:], strict=False)):
        raise ConfigError(f"sensors.qe.wavelength_nm: got {wl}, allowed: strictly increasing [nm]")
    out["qe_wavelength"], out["qe_efficiency"], out["qe_reference"] = wl, eff, str(qe.get("reference", ""))
    out["collection_efficiency"] = check_number(
        cfg["collection_efficiency"], "sensors.collection_efficiency", minimum=0, maximum=1, strict_min=True
    )
    acc = cfg["angular_acceptance"]
    check_keys(acc, required=["kind", "coefficients"], optional=["cos"], where="sensors.angular_acceptance")
    kind = check_choice(acc["kind"], "sensors.angular_acceptance.kind", ACCEPTANCE_KINDS)
    coef = acc["coefficients"]
    if not isinstance(coef, list) or not coef:
        raise ConfigError(f"sensors.angular_acceptance.coefficients: got {coef!r}, expected a non-empty list")
    coef = [check_number(v, f"sensors.angular_acceptance.coefficients[{i}]") for i, v in enumerate(coef)]
    table_cos = None
    if kind == "polynomial":
        if sum(coef) <= 0:
            raise ConfigError(
                f"sensors.angular_acceptance.coefficients: got {coef}, allowed: sum (value at "
                "normal incidence) > 0"
            )
    else:
        table_cos = acc.get("cos")
        if not isinstance(table_cos, list) or len(table_cos) != len(coef) or len(coef) < 2:
            raise ConfigError(
                f"sensors.angular_acceptance.cos: got {table_cos!r}, expected a list of the "
                "same length (>= 2) as coefficients"
            )
        table_cos = [
            check_number(v, f"sensors.angular_acceptance.cos[{i}]", minimum=0, maximum=1)
            for i, v in enumerate(table_cos)
        ]
        if any(b <= a for a, b in zip(table_cos, table_cos[1:], strict=False)) or table_cos[-1] != 1.0:
            raise ConfigError(
                f"sensors.angular_acceptance.cos: got {table_cos}, allowed: increasing, ending at 1"
            )
        if coef[-1] <= 0 or min(coef) < 0:
            raise ConfigError(
                f"sensors.angular_acceptance.coefficients: got {coef}, allowed: >= 0 with last > 0"
            )
    out["acc_kind"], out["acc_coef"], out["acc_cos"] = kind, coef, table_cos
    spe = cfg["spe"]
    check_keys(spe, required=["family", "sigma"], where="sensors.spe")
    out["spe_family"] = check_choice(spe["family"], "sensors.spe.family", SPE_FAMILIES)
    out["spe_sigma"] = check_number(spe["sigma"], "sensors.spe.sigma", minimum=0, maximum=5, strict_min=True)
    out["tts_ns"] = check_number(cfg["tts_ns"], "sensors.tts_ns", minimum=0)
    out["dark_rate_hz"] = check_number(cfg["dark_rate_hz"], "sensors.dark_rate_hz", minimum=0)
    out["threshold_pe"] = check_number(cfg["threshold_pe"], "sensors.threshold_pe", minimum=0)
    return out


PER_PMT_UNITS = {"qe_scale": "1", "gain": "1", "time_offset": "ns"}  # per-PMT calibration values


def check_per_pmt_values(values: Any, n_pmts: int | None, where: str = "sensors") -> dict[str, np.ndarray]:
    """A non-empty mapping with keys among ``PER_PMT_UNITS`` -> {key: (P,) float64 numpy}: each value (P,)
    finite numbers, qe_scale >= 0, gain > 0, P = ``n_pmts`` (None: the first array's length). A bad key,
    shape or value raises ConfigError naming it (``where``.key[i]). Used by
    :meth:`PMTResponse.set_per_pmt_values` and by :func:`physics.io.write_run` (what a file records is what a
    response can be rebuilt with)."""
    if not isinstance(values, dict) or not values:
        got = sorted(map(str, values)) if isinstance(values, dict) else type(values).__name__
        raise ConfigError(f"{where}: got {got}, expected a mapping with keys among {list(PER_PMT_UNITS)}")
    check_keys(values, required=(), optional=PER_PMT_UNITS, where=where)
    out = {}
    for k, v in values.items():
        a = np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v)
        if n_pmts is None and a.ndim == 1:
            n_pmts = a.shape[0]
        if a.dtype.kind not in "iuf" or a.shape != (n_pmts,):
            raise ConfigError(
                f"{where}.{k}: got dtype {a.dtype} shape {a.shape}, expected ({n_pmts},) numbers"
            )
        a = a.astype(np.float64)
        ok, allowed = np.isfinite(a), "finite"
        if k == "qe_scale":
            ok, allowed = ok & (a >= 0), "finite and >= 0"
        elif k == "gain":
            ok, allowed = ok & (a > 0), "finite and > 0"
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ConfigError(f"{where}.{k}[{i}]: got {float(a[i])!r}, allowed: {allowed}")
        out[k] = a
    return out


class PMTResponse(nn.Module):
    """Per-PMT sensor stage (see module docstring for the physics).

    Parameters (calibration targets): ``qe_scale`` (P,) relative QE, ``gain`` (P,) relative gain,
    ``time_offset`` (P,) [ns]. Buffers: QE table (K,) [nm, 1], angular-acceptance coefficients.
    Random draws use a ``torch.Generator`` on the same device as the input tensors.
    """

    def __init__(self, config: dict[str, Any], n_pmts: int):
        super().__init__()
        n_pmts = check_number(n_pmts, "n_pmts", minimum=1, integer=True)
        c = _validate(config)
        self.config = dict(config)
        self.name: str = c["name"]
        self.n_pmts = int(n_pmts)
        self.qe_reference: str = c["qe_reference"]
        self.collection_efficiency = float(c["collection_efficiency"])
        self.acc_kind: str = c["acc_kind"]
        self.spe_family: str = c["spe_family"]
        self.spe_sigma = float(c["spe_sigma"])
        self.tts_ns = float(c["tts_ns"])
        self.dark_rate_hz = float(c["dark_rate_hz"])
        self.threshold_pe = float(c["threshold_pe"])
        f64 = torch.float64
        self.register_buffer("qe_wavelength", torch.tensor(c["qe_wavelength"], dtype=f64))
        self.register_buffer("qe_efficiency", torch.tensor(c["qe_efficiency"], dtype=f64))
        self.register_buffer("acc_coef", torch.tensor(c["acc_coef"], dtype=f64))
        self.register_buffer("acc_cos", torch.tensor(c["acc_cos"] if c["acc_cos"] else [0.0, 1.0], dtype=f64))
        self.qe_scale = nn.Parameter(torch.ones(self.n_pmts))
        self.gain = nn.Parameter(torch.ones(self.n_pmts))
        self.time_offset = nn.Parameter(torch.zeros(self.n_pmts))

    # ------------------------------------------------------------------ the run record
    PER_PMT = tuple(PER_PMT_UNITS)

    def current_config(self) -> dict[str, Any]:
        """The construction config with the scalar settings as they are now (tts_ns, dark_rate_hz,
        threshold_pe, spe.sigma may be edited after construction); ``PMTResponse(current_config(), P)``
        rebuilds this sensor model apart from the per-PMT values (:meth:`per_pmt_values`)."""
        out = dict(self.config)
        out["spe"] = {**dict(self.config["spe"]), "sigma": self.spe_sigma}
        out.update(tts_ns=self.tts_ns, dark_rate_hz=self.dark_rate_hz, threshold_pe=self.threshold_pe)
        return out

    def per_pmt_values(self) -> dict[str, np.ndarray]:
        """Current per-PMT calibration values as float64 numpy arrays (P,): ``qe_scale`` [1], ``gain`` [1],
        ``time_offset`` [ns] (what run files record beside the PMT table)."""
        return {k: getattr(self, k).detach().cpu().double().numpy().copy() for k in self.PER_PMT}

    def set_per_pmt_values(self, values: Any, where: str = "sensors") -> None:
        """Set per-PMT values from a mapping checked by :func:`check_per_pmt_values` (P = this model's
        n_pmts); a bad key, shape or value raises ConfigError naming it (nothing is set)."""
        new = check_per_pmt_values(values, self.n_pmts, where)
        with torch.no_grad():
            for k, a in new.items():
                p = getattr(self, k)
                p.copy_(torch.from_numpy(a).to(device=p.device, dtype=p.dtype))

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, name_or_path: str | os.PathLike = "default", n_pmts: int = 1) -> PMTResponse:
        """From configs/sensors/<name>.yaml ('default' = 3-inch, '20inch') or a YAML path."""
        p = Path(name_or_path)
        if p.suffix not in (".yaml", ".yml"):
            p = config_dir() / "sensors" / f"{name_or_path}.yaml"
            if not p.is_file():
                raise ConfigError(
                    f"sensors: preset {str(name_or_path)!r} not found; allowed: "
                    f"{list_presets()} or a path to a .yaml file"
                )
        return cls(load_yaml(p), n_pmts)

    # ------------------------------------------------------------------ detection
    def quantum_efficiency(self, wavelength: Tensor) -> Tensor:
        """Tabulated QE(lambda) (same shape as wavelength [nm]), linear interpolation, 0 outside the table."""
        return interp_table(wavelength, self.qe_wavelength, self.qe_efficiency)

    def acceptance(self, cos_incidence: Tensor) -> Tensor:
        """Relative angular acceptance A(cos) with A(1) = 1 (same shape as cos_incidence)."""
        return angular_acceptance(cos_incidence, self.acc_kind, self.acc_coef, self.acc_cos)

    def detection_probability(self, wavelength: Tensor, cos_incidence: Tensor, pmt: Tensor) -> Tensor:
        """p = QE(lambda) * qe_scale[pmt] * CE * A(cos), clipped to [0, 1]; inputs (N,) nm, 1, long -> (N,).

        Differentiable in qe_scale."""
        scale = self.qe_scale.to(device=wavelength.device, dtype=wavelength.dtype)[pmt]
        return self._combine(self.quantum_efficiency(wavelength), scale, cos_incidence)

    def detection_matrix(self, wavelength: Tensor, cos_incidence: Tensor) -> Tensor:
        """detection_probability of M photons (wavelength (M,) nm) at P PMTs: cos_incidence (M, P) -> (M, P).

        QE(lambda) is interpolated once per photon rather than once per (photon, PMT) pair."""
        scale = self.qe_scale.to(device=wavelength.device, dtype=wavelength.dtype)
        return self._combine(self.quantum_efficiency(wavelength)[:, None], scale[None, :], cos_incidence)

    def _combine(self, qe: Tensor, scale: Tensor, cos_incidence: Tensor) -> Tensor:
        """QE * qe_scale * CE * A(cos), clipped to [0, 1] (the one place this product is formed)."""
        p = qe * scale * self.collection_efficiency * self.acceptance(cos_incidence)
        return p.clamp(0.0, 1.0)

    def _max_acceptance(self) -> float:
        """Exact max over cos in [0, 1] of A (table nodes; polynomial: ends and stationary points)."""
        coef = self.acc_coef.detach().cpu().numpy()
        if self.acc_kind == "table":
            return float(max(coef.max(), 0.0) / coef[-1])
        cand = [0.0, 1.0]
        if coef.size > 2:
            deriv = np.polynomial.polynomial.polyder(coef)
            roots = np.polynomial.polynomial.polyroots(deriv)
            cand += [float(r.real) for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12 and 0 <= r.real <= 1]
        vals = np.polynomial.polynomial.polyval(np.array(cand), coef) / coef.sum()
        return float(max(vals.max(), 0.0))

    def max_detection_probability(self) -> float:
        """Upper bound of detection_probability over lambda, cos and PMTs (the QE pre-thinning fraction)."""
        qe_max = float(self.qe_efficiency.max())  # a piecewise-linear curve peaks at a node
        s_max = float(self.qe_scale.detach().max().clamp_min(0.0))
        return min(1.0, qe_max * s_max * self.collection_efficiency * self._max_acceptance())

    def detect(
        self, cathode_hits: CathodeHits, generator: torch.Generator, thin: float = 1.0
    ) -> PhotoElectrons:
        """Keep each cathode hit with probability p/thin (photons were pre-thinned by ``thin`` at emission).

        Raises ConfigError if thin is outside (0, 1] or smaller than p anywhere."""
        thin = check_number(thin, "thin", minimum=0, maximum=1, strict_min=True)
        h = cathode_hits
        p = self.detection_probability(h.wavelength, h.cos_incidence, h.pmt)
        if p.numel() and float(p.detach().max()) > thin * (1 + 1e-6):
            raise ConfigError(
                f"thin: got {thin}, but the detection probability reaches "
                f"{float(p.detach().max()):.6g}; allowed: thin >= max_detection_probability() "
                f"= {self.max_detection_probability():.6g}"
            )
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        keep = u < p / thin
        return PhotoElectrons(
            pmt=h.pmt[keep],
            t=h.t[keep],
            event=h.event[keep],
            dark=torch.zeros(int(keep.sum()), dtype=torch.bool, device=p.device),
        )

    # ------------------------------------------------------------------ dark noise
    def dark_noise(
        self,
        n_events: int,
        window_ns: tuple[float, float],
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> PhotoElectrons:
        """Dark p.e.: per event Poisson(R_dark * (t_max - t_min) * 1e-9 * P), PMT and time uniform, dark=True.

        window_ns: (t_min, t_max) [ns]; device defaults to this module's device (match the generator)."""
        n_events = check_number(n_events, "n_events", minimum=0, integer=True)
        if not isinstance(window_ns, (tuple, list)) or len(window_ns) != 2:
            raise ConfigError(f"window_ns: got {window_ns!r}, expected (t_min, t_max) in ns")
        t0 = check_number(window_ns[0], "window_ns[0]")
        t1 = check_number(window_ns[1], "window_ns[1]", minimum=t0)
        dev = torch.device(device) if device is not None else self.qe_efficiency.device
        mean = self.dark_rate_hz * (t1 - t0) * 1e-9 * self.n_pmts
        rate = torch.full((n_events,), mean, device=dev, dtype=torch.float64)
        counts = torch.poisson(rate, generator=generator).long()
        n = int(counts.sum())
        event = torch.repeat_interleave(torch.arange(n_events, device=dev), counts)
        pmt = torch.randint(0, self.n_pmts, (n,), generator=generator, device=dev)
        t = t0 + (t1 - t0) * torch.rand(n, generator=generator, device=dev)
        return PhotoElectrons(pmt=pmt, t=t, event=event, dark=torch.ones(n, dtype=torch.bool, device=dev))

    # ------------------------------------------------------------------ digitisation
    def digitize(
        self, pe: PhotoElectrons, n_events: int, generator: torch.Generator
    ) -> tuple[Hits, dict[str, Tensor]]:
        """Hits per (event, PMT) and the digitised p.e. (for waveform synthesis).

        q_j = gain[pmt_j] * SPE sample (mean 1); t_j = t_j + N(0, tts^2) + time_offset[pmt_j];
        hit charge = sum q_j, hit time = min t_j; hits with charge < threshold_pe are removed.
        Returns (hits sorted by (event, pmt), {'charge' (N,) [p.e.], 't' (N,) [ns] after TTS and offset,
        'pmt' (N,), 'event' (N,), 'dark' (N,)} in the order of ``pe``). Differentiable in gain and
        time_offset."""
        n_events = check_number(n_events, "n_events", minimum=0, integer=True)
        if len(pe) and int(pe.event.max()) >= n_events:
            raise ConfigError(
                f"n_events: got {n_events}, but photoelectrons reference event {int(pe.event.max())}"
            )
        if len(pe) and (int(pe.pmt.min()) < 0 or int(pe.pmt.max()) >= self.n_pmts):
            raise ConfigError(
                f"pe.pmt: values in [{int(pe.pmt.min())}, {int(pe.pmt.max())}], "
                f"allowed: [0, {self.n_pmts - 1}]"
            )
        dev, dt = pe.t.device, pe.t.dtype if pe.t.is_floating_point() else torch.float32
        n = len(pe)
        q = sample_spe(n, self.spe_family, self.spe_sigma, generator, dev, dt)
        q = q * self.gain.to(device=dev, dtype=dt)[pe.pmt]
        t = pe.t.to(dt) + self.tts_ns * torch.randn(n, generator=generator, device=dev, dtype=dt)
        t = t + self.time_offset.to(device=dev, dtype=dt)[pe.pmt]
        hits = first_hit_digitize(pe.pmt, pe.event, t, q, self.n_pmts, self.threshold_pe)
        return hits, {"charge": q, "t": t, "pmt": pe.pmt, "event": pe.event, "dark": pe.dark}

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """Human-readable one-block description for the CLI."""
        i = int(torch.argmax(self.qe_efficiency))
        wl = self.qe_wavelength
        mean, rel_var = spe_moments(self.spe_family, self.spe_sigma)
        return "\n".join(
            [
                f"PMTResponse '{self.name}': {self.n_pmts} PMTs",
                f"  QE peak {float(self.qe_efficiency[i]):.3f} at {float(self.qe_wavelength[i]):.0f} nm "
                f"(table {float(wl[0]):.0f}-{float(wl[-1]):.0f} nm; {self.qe_reference})",
                f"  qe_scale mean {float(self.qe_scale.detach().mean()):.3f}, "
                f"collection eff. {self.collection_efficiency:.3f}, "
                f"angular acceptance {self.acc_kind} {[round(float(c), 4) for c in self.acc_coef]}",
                f"  max detection probability {self.max_detection_probability():.4f}",
                f"  SPE {self.spe_family} sigma {self.spe_sigma:.3f} (rel. variance after normalisation "
                f"{rel_var:.4f}), gain mean {float(self.gain.detach().mean()):.3f}",
                f"  TTS {self.tts_ns:.3f} ns (1 sigma), "
                f"time offsets mean {float(self.time_offset.detach().mean()):.3f} ns",
                f"  dark rate {self.dark_rate_hz:.1f} Hz, threshold {self.threshold_pe:.3f} p.e.",
            ]
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_pmts={self.n_pmts}"


def list_presets() -> list[str]:
    """Names of the sensor presets in configs/sensors/."""
    return sorted(p.stem for p in (config_dir() / "sensors").glob("*.yaml"))
