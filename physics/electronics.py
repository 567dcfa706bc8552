"""Front-end electronics: pulse-template family, baseline noise, sampling, ADC quantisation and saturation.

Model (design §4 "Electronics"): every photoelectron i of charge q_i [p.e.] arriving at time t_i [ns] on
channel c adds ``gain * q_i * f(t - t_i)`` to the analogue waveform of c, where f is a unit-area pulse
template [1/ns] and ``gain`` is the pulse area of one p.e. [ADC·ns]. The waveform is point-sampled at
``t_k = t_start[c] - pre_trigger + k * sampling_period`` (k = 0..n_samples-1), a baseline [ADC] is added,
then baseline noise (white Gaussian + stationary AR(1) correlated noise, i.e. a sampled
Ornstein-Uhlenbeck process), then the ADC rounds/floors to integers and clamps to [0, 2^bits - 1]
(saturation).

Template family (all normalised to unit area, time s = t - t_i >= 0 after the onset, f = 0 before):

* ``lognormal`` (tau, sigma): f(s) = exp(-(ln(s/tau))^2 / (2 sigma^2)) / (s sigma sqrt(2 pi)).
  Log-normal PMT pulse as used e.g. by S. Jetter et al., "PMT waveform modeling at the Daya Bay
  experiment", Chinese Phys. C 36 (2012) 733 (arXiv:1202.1849).
* ``biexp`` (rise, fall): f(s) = (exp(-s/fall) - exp(-s/rise)) / (fall - rise), fall > rise: the response
  of a CR-RC shaper / a current pulse through an RC load (e.g. W. R. Leo, "Techniques for Nuclear and
  Particle Physics Experiments", 2nd ed., Springer 1994, §17.5).
* ``ringing`` (rise, fall, ring_amp, ring_period, ring_decay, ring_delay): bi-exponential main pulse plus a
  damped oscillation starting ``ring_delay`` after the onset (impedance mismatch / cable reflection
  ringing), r(s) = -exp(-u/ring_decay) sin(2 pi u / ring_period), u = s - ring_delay >= 0, with amplitude
  ``ring_amp`` times the main-pulse peak; the sum is renormalised to unit net area:
  f = (b + A r) / (1 + A R), R = int r ds = -w / (w^2 + 1/ring_decay^2), w = 2 pi / ring_period.

All kernels are pure torch functions (differentiable in s and in the shape parameters; float64 works).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from physics.config import ConfigError, check_choice, check_keys, check_number, config_dir, load_yaml

SHAPES: dict[str, tuple[str, ...]] = {
    "lognormal": ("tau", "sigma"),
    "biexp": ("rise", "fall"),
    "ringing": ("rise", "fall", "ring_amp", "ring_period", "ring_decay", "ring_delay"),
}
QUANTISATION = ("round", "floor")


# ----------------------------------------------------------------------------------------------- kernels
def lognormal_template(s: Tensor, tau: Tensor | float, sigma: Tensor | float) -> Tensor:
    """Unit-area log-normal pulse f(s) [1/ns] at time s [ns] after the onset (any shape); 0 for s <= 0.

    f(s) = exp(-(ln(s/tau))^2 / (2 sigma^2)) / (s sigma sqrt(2 pi)); median tau [ns], width sigma (log).
    Gradient-safe at s <= 0 (no NaN through the masked branch).
    """
    pos = s > 0
    ss = torch.where(pos, s, torch.ones_like(s))
    z = torch.log(ss / tau) / sigma
    f = torch.exp(-0.5 * z * z) / (ss * sigma * math.sqrt(2.0 * math.pi))
    return torch.where(pos, f, torch.zeros_like(f))


def biexp_template(s: Tensor, rise: Tensor | float, fall: Tensor | float) -> Tensor:
    """Unit-area bi-exponential pulse f(s) = (e^{-s/fall} - e^{-s/rise}) / (fall - rise) [1/ns]; 0 for s<0.

    s: time after onset [ns] (any shape); rise < fall [ns].
    """
    pos = s >= 0
    ss = torch.where(pos, s, torch.zeros_like(s))
    f = (torch.exp(-ss / fall) - torch.exp(-ss / rise)) / (fall - rise)
    return torch.where(pos, f, torch.zeros_like(f))


def biexp_peak(rise: float, fall: float) -> tuple[float, float]:
    """(time of maximum [ns], maximum [1/ns]) of biexp: t* = ln(fall/rise) rise fall/(fall-rise)."""
    tp = math.log(fall / rise) * rise * fall / (fall - rise)
    return tp, (math.exp(-tp / fall) - math.exp(-tp / rise)) / (fall - rise)


def ringing_template(
    s: Tensor,
    rise: Tensor | float,
    fall: Tensor | float,
    ring_amp: float,
    ring_period: float,
    ring_decay: float,
    ring_delay: float,
) -> Tensor:
    """Unit-net-area bi-exponential pulse with a damped ringing tail [1/ns] (formula in module docstring).

    s: time after onset [ns]; ring_amp: oscillation amplitude / main-pulse peak; ring_period, ring_decay,
    ring_delay [ns].
    """
    b = biexp_template(s, rise, fall)
    _, peak = biexp_peak(float(rise), float(fall))
    amp = ring_amp * peak
    w = 2.0 * math.pi / ring_period
    u = s - ring_delay
    pos = u >= 0
    uu = torch.where(pos, u, torch.zeros_like(u))
    r = -torch.exp(-uu / ring_decay) * torch.sin(w * uu)
    r = torch.where(pos, r, torch.zeros_like(r))
    area_r = -w / (w * w + 1.0 / ring_decay**2)
    return (b + amp * r) / (1.0 + amp * area_r)


def template(shape: str, s: Tensor, params: Mapping[str, Any]) -> Tensor:
    """Evaluate the unit-area template ``shape`` (one of :data:`SHAPES`) at s [ns] after the onset."""
    if shape == "lognormal":
        return lognormal_template(s, params["tau"], params["sigma"])
    if shape == "biexp":
        return biexp_template(s, params["rise"], params["fall"])
    if shape == "ringing":
        return ringing_template(s, **{k: params[k] for k in SHAPES["ringing"]})
    raise ConfigError(f"electronics.shape: got {shape!r}, allowed: {list(SHAPES)}")


def ar1_cholesky(n: int, phi: float, sigma: float, dtype=torch.float32, device=None) -> Tensor:
    """Lower Cholesky factor L (n,n) of the stationary AR(1) covariance sigma^2 phi^|i-j|.

    x = L @ eps (eps ~ N(0,1)) is a stationary AR(1) sequence x_k = phi x_{k-1} + sqrt(1-phi^2) sigma e_k,
    i.e. an Ornstein-Uhlenbeck process sampled with period dt, phi = exp(-dt/tau_c) (closed form:
    L[k,0] = sigma phi^k, L[k,j] = sigma sqrt(1-phi^2) phi^(k-j) for 1 <= j <= k).
    """
    k = torch.arange(n, dtype=torch.float64, device=device)
    diff = k[:, None] - k[None, :]
    L = torch.where(diff >= 0, phi ** diff.clamp_min(0), torch.zeros_like(diff)) * sigma
    L[:, 1:] *= math.sqrt(max(1.0 - phi * phi, 0.0))
    return L.to(dtype)


# ----------------------------------------------------------------------------------------------- config
DEFAULTS: dict[str, Any] = {
    "quantisation": "round",
    "corr_sigma": 0.0,
    "corr_time": 10.0,
}


def validate_config(cfg: Mapping[str, Any], where: str = "electronics") -> dict[str, Any]:
    """Check an electronics config mapping; returns a complete, normalised copy (ConfigError if bad)."""
    check_keys(
        cfg,
        required=[
            "shape",
            "shape_params",
            "gain",
            "sampling_period",
            "n_samples",
            "pre_trigger",
            "baseline",
            "white_sigma",
            "adc_bits",
        ],
        optional=["corr_sigma", "corr_time", "quantisation", "name", "description"],
        where=where,
    )
    out: dict[str, Any] = {**DEFAULTS, **dict(cfg)}
    shape = check_choice(out["shape"], f"{where}.shape", SHAPES)
    sp = out["shape_params"]
    check_keys(sp, required=SHAPES[shape], where=f"{where}.shape_params")
    sp = {k: check_number(sp[k], f"{where}.shape_params.{k}") for k in SHAPES[shape]}
    for k, v in sp.items():
        if k != "ring_amp" and k != "ring_delay" and v <= 0:
            raise ConfigError(f"{where}.shape_params.{k}: got {v!r}, allowed: > 0")
    if shape in ("biexp", "ringing") and not sp["fall"] > sp["rise"]:
        raise ConfigError(f"{where}.shape_params.fall: got {sp['fall']!r}, allowed: > rise ({sp['rise']!r})")
    if shape == "ringing":
        check_number(sp["ring_amp"], f"{where}.shape_params.ring_amp", minimum=0.0, maximum=1.0)
        check_number(sp["ring_delay"], f"{where}.shape_params.ring_delay", minimum=0.0)
        w = 2 * math.pi / sp["ring_period"]
        _, peak = biexp_peak(sp["rise"], sp["fall"])
        if 1.0 - sp["ring_amp"] * peak * w / (w * w + sp["ring_decay"] ** -2) <= 0.1:
            raise ConfigError(
                f"{where}.shape_params.ring_amp: got {sp['ring_amp']!r}: ringing cancels the pulse "
                "area (allowed: net area factor > 0.1)"
            )
    out["shape_params"] = sp
    out["gain"] = check_number(out["gain"], f"{where}.gain", minimum=0.0, strict_min=True)
    out["sampling_period"] = check_number(
        out["sampling_period"], f"{where}.sampling_period", minimum=0.0, strict_min=True
    )
    out["n_samples"] = check_number(
        out["n_samples"], f"{where}.n_samples", minimum=2, maximum=1 << 16, integer=True
    )
    out["pre_trigger"] = check_number(out["pre_trigger"], f"{where}.pre_trigger", minimum=0.0)
    out["adc_bits"] = check_number(out["adc_bits"], f"{where}.adc_bits", minimum=4, maximum=24, integer=True)
    out["baseline"] = check_number(
        out["baseline"], f"{where}.baseline", minimum=0.0, maximum=float(2 ** out["adc_bits"] - 1)
    )
    out["white_sigma"] = check_number(out["white_sigma"], f"{where}.white_sigma", minimum=0.0)
    out["corr_sigma"] = check_number(out["corr_sigma"], f"{where}.corr_sigma", minimum=0.0)
    out["corr_time"] = check_number(out["corr_time"], f"{where}.corr_time", minimum=0.0, strict_min=True)
    out["quantisation"] = check_choice(out["quantisation"], f"{where}.quantisation", QUANTISATION)
    return out


# ----------------------------------------------------------------------------------------------- module
class Electronics(nn.Module):
    """Waveform digitiser stage (see module docstring for the model and the template formulas).

    Buffers (float64 scalars; a calibration may turn them into parameters): ``gain`` [ADC·ns per p.e.],
    ``baseline`` [ADC], ``white_sigma`` [ADC], ``corr_sigma`` [ADC], shape parameters ``shape_<name>``.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = validate_config(config)
        self.config = cfg
        self.shape = cfg["shape"]
        self.sampling_period = float(cfg["sampling_period"])
        self.n_samples = int(cfg["n_samples"])
        self.pre_trigger = float(cfg["pre_trigger"])
        self.adc_bits = int(cfg["adc_bits"])
        self.adc_max = float(2**self.adc_bits - 1)
        self.corr_time = float(cfg["corr_time"])
        self.quantisation = cfg["quantisation"]
        for k, v in cfg["shape_params"].items():
            self.register_buffer(f"shape_{k}", torch.tensor(float(v), dtype=torch.float64))
        for k in ("gain", "baseline", "white_sigma", "corr_sigma"):
            self.register_buffer(k, torch.tensor(float(cfg[k]), dtype=torch.float64))

    # -- construction
    @classmethod
    def load(cls, name_or_path: str | Path = "default") -> Electronics:
        """From ``configs/electronics/<name>.yaml`` or a YAML path."""
        p = Path(name_or_path)
        if p.suffix not in (".yaml", ".yml"):
            p = config_dir() / "electronics" / f"{name_or_path}.yaml"
            if not p.is_file():
                raise ConfigError(
                    f"electronics: got {str(name_or_path)!r}, allowed: {list_presets()} or a YAML path"
                )
        return cls(load_yaml(p))

    def config_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)

    @property
    def device(self) -> torch.device:
        return self.gain.device

    @property
    def shape_params(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"shape_{k}") for k in SHAPES[self.shape]}

    def sample_offsets(self, dtype=torch.float64, device=None) -> Tensor:
        """(S,) sample times relative to the channel's t_start [ns]: -pre_trigger + k * sampling_period."""
        k = torch.arange(self.n_samples, dtype=dtype, device=device if device is not None else self.device)
        return -self.pre_trigger + k * self.sampling_period

    def pulse(self, s: Tensor) -> Tensor:
        """Unit-area template [1/ns] at time s [ns] after the onset (dtype/device of s)."""
        sp = {
            k: (v.to(s) if k in ("tau", "sigma", "rise", "fall") else float(v))
            for k, v in self.shape_params.items()
        }
        return template(self.shape, s, sp)

    # -- expected-value face
    def expect(
        self, channel: Tensor, t: Tensor, charge: Tensor, n_channels: int, t_start: Tensor | None = None
    ) -> Tensor:
        """Clean analogue waveform (C, S) [ADC, baseline included], before noise, quantisation, saturation.

        channel (N,) long in [0, C); t (N,) p.e. arrival time [ns]; charge (N,) [p.e.]; t_start (C,) [ns]
        (trigger time of each channel, default 0). Differentiable in t, charge and the buffers; dtype from t.
        Vectorised: templates at all sample times (N, S) then index_add into (C, S).
        """
        channel = torch.as_tensor(channel, device=t.device).long()
        if channel.shape != t.shape or charge.shape != t.shape or t.dim() != 1:
            raise ConfigError(
                f"electronics.expect: channel/t/charge shapes {tuple(channel.shape)}, "
                f"{tuple(t.shape)}, {tuple(charge.shape)}; expected equal 1-D shapes"
            )
        n_channels = int(n_channels)
        if channel.numel() and (int(channel.min()) < 0 or int(channel.max()) >= n_channels):
            raise ConfigError(
                f"electronics.expect: channel ids must lie in [0, {n_channels}), "
                f"got [{int(channel.min())}, {int(channel.max())}]"
            )
        dtype = t.dtype if t.is_floating_point() else torch.float64
        if t_start is None:
            t_start = torch.zeros(n_channels, dtype=dtype, device=t.device)
        t_start = torch.as_tensor(t_start, dtype=dtype, device=t.device)
        offs = self.sample_offsets(dtype, t.device)
        out = self.baseline.to(dtype).expand(n_channels, self.n_samples).clone()
        if t.numel() == 0:
            return out
        s = (t_start[channel][:, None] + offs[None, :]) - t[:, None]  # (N, S) time after onset
        amp = self.pulse(s) * (self.gain.to(dtype) * charge.to(dtype))[:, None]
        return out.index_add(0, channel, amp)

    # -- Monte-Carlo face
    def noise(
        self,
        n_channels: int,
        generator: torch.Generator | None,
        noise_scale: Tensor | float = 1.0,
        dtype=torch.float32,
    ) -> Tensor:
        """(C, S) baseline noise [ADC]: white N(0, white_sigma^2) + stationary AR(1) (Ornstein-Uhlenbeck).

        AR(1): correlation phi^|lag| with phi = exp(-sampling_period/corr_time), variance corr_sigma^2.
        noise_scale: scalar or (C,) factor multiplying both sigmas.
        """
        dev = self.device
        shape = (int(n_channels), self.n_samples)
        out = torch.randn(shape, generator=generator, device=dev, dtype=dtype) * float(self.white_sigma)
        if float(self.corr_sigma) > 0:
            phi = math.exp(-self.sampling_period / self.corr_time)
            L = ar1_cholesky(self.n_samples, phi, float(self.corr_sigma), dtype=dtype, device=dev)
            e = torch.randn(shape, generator=generator, device=dev, dtype=dtype)
            out = out + e @ L.T
        scale = torch.as_tensor(noise_scale, dtype=dtype, device=dev)
        return out * (scale[:, None] if scale.dim() == 1 else scale)

    def digitise(self, analogue: Tensor) -> Tensor:
        """ADC conversion: round/floor, clamp to [0, 2^bits - 1] (saturation); int16 (bits<=15) or int32."""
        q = torch.round(analogue) if self.quantisation == "round" else torch.floor(analogue)
        q = q.clamp(0.0, self.adc_max)
        return q.to(torch.int16 if self.adc_bits <= 15 else torch.int32)

    def sample(
        self,
        channel: Tensor,
        t: Tensor,
        charge: Tensor,
        n_channels: int,
        t_start: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_scale: Tensor | float = 1.0,
    ) -> Tensor:
        """(C, S) digitised waveforms [ADC counts]: expect + noise, quantised, saturated (integer dtype)."""
        with torch.no_grad():
            clean = self.expect(
                channel,
                t.double(),
                charge.double(),
                n_channels,
                None if t_start is None else torch.as_tensor(t_start).double(),
            )
            return self.digitise(clean + self.noise(n_channels, generator, noise_scale, torch.float64))

    def oracle_sigma(self, noise_scale: float = 1.0) -> float:
        """Total per-sample noise RMS [ADC] incl. quantisation (1/sqrt(12) LSB): sqrt(w^2 + c^2 + 1/12)."""
        return math.sqrt(
            noise_scale**2 * (float(self.white_sigma) ** 2 + float(self.corr_sigma) ** 2) + 1 / 12
        )


def list_presets() -> list[str]:
    """Names of the electronics presets in configs/electronics/."""
    return sorted(p.stem for p in (config_dir() / "electronics").glob("*.yaml"))
