"""Optical and stopping properties of the detector medium (water, liquid scintillator).

Units: wavelength nm, lengths m, times ns, energies MeV. Every method takes a wavelength tensor ``wl`` of any
shape and returns a tensor of the same shape, dtype and device.

Physics:

* Refractive index n(lambda): constant, four-term Sellmeier form n^2 = 1 + sum_i B_i l^2 / (l^2 - C_i)
  (l in um; water coefficients after Daimon & Masumura, Appl. Opt. 46 (2007) 3811), or a table interpolated
  with a C1 cubic Hermite spline (analytic derivative).
* Group index n_g = n - lambda dn/dlambda (Jackson, Classical Electrodynamics, 3rd ed., sec. 7.8); photons
  travel at c / n_g. The derivative is analytic (Sellmeier, Hermite spline), never a finite difference.
* Absorption length(lambda): tabulated absorption coefficient a(lambda) [1/m] (pure water after
  Pope & Fry, Appl. Opt. 36 (1997) 8710), linearly interpolated, length = abs_scale / a.
* Rayleigh scattering length: power law b(lambda) = b0 (lambda / lambda0)^-p [1/m] (Morel 1974:
  b0 = 0.00288 /m at 500 nm, p = 4.32 for pure water; p = 4 is the ideal lambda^-4 law), or a table;
  length = rayleigh_scale / b. Phase function 3/8 (1 + cos^2 theta) (unpolarised Rayleigh).
* Mie scattering (optional): length L(lambda) = L0 (lambda / lambda0)^q times mie_scale, Henyey-Greenstein
  phase function with asymmetry g (Henyey & Greenstein, ApJ 93 (1941) 70); inf when disabled.

Stopping data (used by :mod:`physics.emission`): density, <Z/A>, mean excitation energy I and the
Sternheimer density-effect coefficients (Sternheimer, Berger & Seltzer, ADNDT 30 (1984) 261, as tabulated
by the PDG), and the radiation length X0.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConfigError, check_keys, check_number, config_dir, load_yaml

__all__ = [
    "Medium",
    "Scintillator",
    "sample_rayleigh_cos",
    "sample_hg_cos",
    "rayleigh_pdf",
    "hg_pdf",
    "interp1d",
    "sample_piecewise_linear",
]


# ----------------------------------------------------------------------------------------------------------
# small numerical kernels
# ----------------------------------------------------------------------------------------------------------
def interp1d(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), constant beyond the ends.

    Differentiable in ``fp`` and ``x``. Shapes: x (...), xp (K,), fp (K,) -> (...).
    """
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    xc = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, xc.detach().contiguous(), right=True).clamp(1, xp.numel() - 1)
    if x.ndim == 1:  # 1-D look-ups with index_select (same values as advanced indexing, faster on CPU)
        j = i - 1
        x0, x1 = xp.index_select(0, j), xp.index_select(0, i)
        f0, f1 = fp.index_select(0, j), fp.index_select(0, i)
    else:
        x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = (xc - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


def _hermite_tangents(x: Tensor, y: Tensor) -> Tensor:
    """Finite-difference (non-uniform centred) tangents of a table, one-sided at the ends."""
    m = torch.empty_like(y)
    m[1:-1] = (y[2:] - y[:-2]) / (x[2:] - x[:-2])
    m[0] = (y[1] - y[0]) / (x[1] - x[0])
    m[-1] = (y[-1] - y[-2]) / (x[-1] - x[-2])
    return m


def _hermite_eval(xq: Tensor, x: Tensor, y: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Cubic Hermite spline value and analytic derivative at xq (clamped to the table; slope 0 outside)."""
    x, y, m = (t.to(device=xq.device, dtype=xq.dtype) for t in (x, y, m))
    inside = (xq >= x[0]) & (xq <= x[-1])
    xc = xq.clamp(x[0], x[-1])
    i = torch.searchsorted(x, xc.detach().contiguous(), right=True).clamp(1, x.numel() - 1)
    h = x[i] - x[i - 1]
    t = (xc - x[i - 1]) / h
    t2, t3 = t * t, t * t * t
    h00, h10, h01, h11 = 2 * t3 - 3 * t2 + 1, t3 - 2 * t2 + t, -2 * t3 + 3 * t2, t3 - t2
    val = h00 * y[i - 1] + h10 * h * m[i - 1] + h01 * y[i] + h11 * h * m[i]
    d00, d10, d01, d11 = 6 * t2 - 6 * t, 3 * t2 - 4 * t + 1, -6 * t2 + 6 * t, 3 * t2 - 2 * t
    der = (d00 * y[i - 1] + d11 * h * m[i] + d01 * y[i] + d10 * h * m[i - 1]) / h
    return val, torch.where(inside, der, torch.zeros_like(der))


def _device_of(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def sample_rayleigh_cos(
    n: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Exact samples of cos(theta) from the Rayleigh phase function p(mu) = 3/8 (1 + mu^2) on [-1, 1].

    Inverse CDF: F(mu) = 1/2 + 3/8 (mu + mu^3/3) = u  <=>  mu^3 + 3 mu + (4 - 8u) = 0, a depressed cubic
    with a single real root (Cardano): mu = A - 1/A, A = cbrt(r + sqrt(r^2 + 1)), r = 4u - 2. Returns (n,).
    """
    dev = _device_of(generator, device)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    r = 4.0 * u - 2.0
    a = torch.pow(r + torch.sqrt(r * r + 1.0), 1.0 / 3.0)  # argument > 0 always
    return (a - 1.0 / a).clamp(-1.0, 1.0).to(dtype)


def rayleigh_pdf(mu: Tensor) -> Tensor:
    """Rayleigh phase function density in cos(theta): 3/8 (1 + mu^2)."""
    return 0.375 * (1.0 + mu * mu)


def sample_hg_cos(
    n: int,
    g: float | Tensor,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Samples of cos(theta) from the Henyey-Greenstein phase function with asymmetry g (|g| < 1).

    p(mu) = (1 - g^2) / (2 (1 + g^2 - 2 g mu)^{3/2}); inverse CDF
    mu = [1 + g^2 - ((1 - g^2) / (1 - g + 2 g u))^2] / (2 g), and mu = 2u - 1 for g = 0. Returns (n,).
    """
    dev = _device_of(generator, device)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    g_t = torch.as_tensor(g, dtype=torch.float64, device=dev)
    if bool((g_t.abs() >= 1).any()):
        raise ConfigError(f"mie_g: got {g!r}, allowed: -1 < g < 1")
    small = g_t.abs() < 1e-6
    gs = torch.where(small, torch.full_like(g_t, 1e-6), g_t)
    s = (1.0 - gs * gs) / (1.0 - gs + 2.0 * gs * u)
    mu = (1.0 + gs * gs - s * s) / (2.0 * gs)
    mu = torch.where(small, 2.0 * u - 1.0, mu)
    return mu.clamp(-1.0, 1.0).to(dtype)


def hg_pdf(mu: Tensor, g: float) -> Tensor:
    """Henyey-Greenstein density in cos(theta)."""
    return 0.5 * (1 - g * g) / (1 + g * g - 2 * g * mu) ** 1.5


def sample_piecewise_linear(
    x: Tensor,
    y: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Exact samples (n,) from the density proportional to the piecewise-linear table (x increasing, y >= 0).

    The CDF is piecewise quadratic; inside a cell y0 s + (y1 - y0) s^2 / (2h) = r is solved in the stable form
    s = 2r / (y0 + sqrt(y0^2 + 2 r (y1 - y0) / h)).
    """
    dev = _device_of(generator, device)
    x = torch.as_tensor(x, dtype=torch.float64).to(dev)
    y = torch.as_tensor(y, dtype=torch.float64).to(dev)
    area = 0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])
    cdf = torch.cat([area.new_zeros(1), torch.cumsum(area, 0)])
    total = cdf[-1]
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * total
    i = torch.searchsorted(cdf, u, right=True).clamp(1, x.numel() - 1)
    # skip empty cells (zero area) by moving to the first cell with positive area at or after i
    h = x[i] - x[i - 1]
    y0, y1 = y[i - 1], y[i]
    r = (u - cdf[i - 1]).clamp_min(0.0)
    slope = (y1 - y0) / h
    disc = (y0 * y0 + 2 * slope * r).clamp_min(0.0)
    s = 2 * r / (y0 + torch.sqrt(disc)).clamp_min(1e-300)
    return (x[i - 1] + torch.minimum(s, h)).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# config helpers
# ----------------------------------------------------------------------------------------------------------
def _number_list(
    value: Any,
    field: str,
    *,
    n: int | None = None,
    minimum: float | None = None,
    strict_min: bool = False,
    increasing: bool = False,
) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ConfigError(f"{field}: got {value!r}, expected a non-empty list of numbers")
    out = [
        check_number(v, f"{field}[{i}]", minimum=minimum, strict_min=strict_min) for i, v in enumerate(value)
    ]
    if n is not None and len(out) != n:
        raise ConfigError(f"{field}: got {len(out)} values, expected {n} (same length as its partner list)")
    if increasing and any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"{field}: got {value!r}, expected strictly increasing values")
    return out


def _table(
    cfg: dict, where: str, xkey: str, ykey: str, *, ymin: float = 0.0, strict: bool = True
) -> tuple[list[float], list[float]]:
    x = _number_list(cfg.get(xkey), f"{where}.{xkey}", minimum=0.0, strict_min=True, increasing=True)
    if len(x) < 2:
        raise ConfigError(f"{where}.{xkey}: got {len(x)} point(s), expected at least 2")
    y = _number_list(cfg.get(ykey), f"{where}.{ykey}", n=len(x), minimum=ymin, strict_min=strict)
    return x, y


def _resolve_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p
    if not isinstance(name_or_path, str) or not name_or_path.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"medium: got {name_or_path!r}, expected a preset name or a path to a YAML file")
    cand = config_dir() / "media" / f"{name_or_path}.yaml"
    if not cand.is_file():
        avail = sorted(q.stem for q in (config_dir() / "media").glob("*.yaml"))
        raise ConfigError(f"medium: got {name_or_path!r}, allowed presets: {avail} or a YAML path")
    return cand


_TOP_KEYS = (
    "name",
    "description",
    "wavelength_range_nm",
    "refractive_index",
    "absorption",
    "rayleigh",
    "mie",
    "material",
    "scintillation",
    "references",
)


# ----------------------------------------------------------------------------------------------------------
# Medium
# ----------------------------------------------------------------------------------------------------------
class Medium(nn.Module):
    """Homogeneous optical medium with fitted scale parameters.

    Parameters (0-dim float64 ``nn.Parameter``s, fitted by calibration): ``abs_scale``, ``rayleigh_scale``,
    ``mie_scale`` multiply the respective lengths. Outputs follow the dtype/device of the wavelength input.

    Attributes: name, wl_min, wl_max [nm], mie_enabled, mie_g, density [g/cm^3], z_over_a, mean_excitation_ev,
    sternheimer (dict a, k, x0, x1, cbar, delta0), radiation_length [m].
    """

    SCALES = ("abs_scale", "rayleigh_scale", "mie_scale")

    def __init__(self, config: dict[str, Any], *, where: str = "medium") -> None:
        super().__init__()
        check_keys(
            config,
            required=("name", "refractive_index", "absorption", "rayleigh", "material"),
            optional=_TOP_KEYS,
            where=where,
        )
        self.config = config
        self.name = str(config["name"])
        wr = config.get("wavelength_range_nm", [300.0, 600.0])
        wr = _number_list(
            wr, f"{where}.wavelength_range_nm", n=2, minimum=0.0, strict_min=True, increasing=True
        )
        self.wl_min, self.wl_max = float(wr[0]), float(wr[1])
        self._init_rindex(config["refractive_index"], f"{where}.refractive_index")
        self._init_absorption(config["absorption"], f"{where}.absorption")
        self._init_rayleigh(config["rayleigh"], f"{where}.rayleigh")
        self._init_mie(config.get("mie", {"enabled": False}), f"{where}.mie")
        self._init_material(config["material"], f"{where}.material")

    def scales(self) -> dict[str, float]:
        """Current values of the scale parameters ``SCALES`` (after calibration or edits; +inf switches a
        process off, e.g. rayleigh_scale = inf: no Rayleigh scattering), as recorded in run files."""
        return {k: float(getattr(self, k).detach()) for k in self.SCALES}

    def set_scales(self, values: Any, where: str = "medium_scales") -> None:
        """Set scale parameters from a mapping with keys among ``SCALES``, each a number > 0 or +inf; any
        other key or value raises ConfigError naming it (nothing is set then)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: got {values!r}, expected a mapping of {list(self.SCALES)}")
        check_keys(values, required=(), optional=self.SCALES, where=where)
        new = {}
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) > 0.0:
                raise ConfigError(f"{where}.{k}: got {v!r}, allowed: a number > 0 or inf")
            new[k] = float(v)
        with torch.no_grad():
            for k, v in new.items():
                getattr(self, k).fill_(v)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike = "water") -> Medium:
        """Load configs/media/NAME.yaml or a YAML path; a ``scintillation`` block gives a Scintillator."""
        path = _resolve_path(name_or_path)
        cfg = load_yaml(path)
        where = f"medium {path.name}"
        if "scintillation" in cfg:
            return Scintillator(cfg, where=where)
        if cls is Scintillator:
            raise ConfigError(f"{where}: no 'scintillation' block, cannot build a Scintillator")
        return Medium(cfg, where=where)

    @staticmethod
    def list_presets() -> list[str]:
        return sorted(q.stem for q in (config_dir() / "media").glob("*.yaml"))

    def _init_rindex(self, cfg: dict, where: str) -> None:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: got {cfg!r}, expected a mapping with a 'model' key")
        model = cfg.get("model")
        self.rindex_model = model
        if model == "constant":
            check_keys(cfg, required=("model", "n"), where=where)
            self.register_buffer(
                "_n_const",
                torch.tensor(check_number(cfg["n"], f"{where}.n", minimum=1.0), dtype=torch.float64),
            )
        elif model == "sellmeier":
            check_keys(cfg, required=("model", "B", "C_um2"), optional=("reference",), where=where)
            b = _number_list(cfg["B"], f"{where}.B")
            c = _number_list(cfg["C_um2"], f"{where}.C_um2", n=len(b), minimum=0.0)
            for ci in c:
                if self.wl_min * 1e-3 <= math.sqrt(ci) <= self.wl_max * 1e-3:
                    raise ConfigError(
                        f"{where}.C_um2: resonance at {math.sqrt(ci) * 1e3:.1f} nm lies inside "
                        f"the wavelength range [{self.wl_min}, {self.wl_max}] nm"
                    )
            self.register_buffer("_sell_b", torch.tensor(b, dtype=torch.float64))
            self.register_buffer("_sell_c", torch.tensor(c, dtype=torch.float64))
            self._sell_terms = tuple(zip((float(v) for v in b), (float(v) for v in c), strict=True))
        elif model == "table":
            check_keys(cfg, required=("model", "wavelength_nm", "n"), optional=("reference",), where=where)
            x, y = _table(cfg, where, "wavelength_nm", "n", ymin=1.0, strict=False)
            xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
            self.register_buffer("_n_wl", xt)
            self.register_buffer("_n_val", yt)
            self.register_buffer("_n_tan", _hermite_tangents(xt, yt))
        else:
            raise ConfigError(f"{where}.model: got {model!r}, allowed: ['constant', 'sellmeier', 'table']")
        n_band = self.refractive_index(torch.linspace(self.wl_min, self.wl_max, 301, dtype=torch.float64))
        if not bool(torch.isfinite(n_band).all()) or float(n_band.min()) < 1.0:
            raise ConfigError(
                f"{where}: refractive index must be finite and >= 1 on "
                f"[{self.wl_min}, {self.wl_max}] nm (got min {float(n_band.min())})"
            )
        self.n_max = float(n_band.max())
        self.n_min = float(n_band.min())

    def _init_absorption(self, cfg: dict, where: str) -> None:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: got {cfg!r}, expected a mapping")
        model = cfg.get("model", "table")
        scale = check_number(cfg.get("scale", 1.0), f"{where}.scale", minimum=0.0, strict_min=True)
        if model == "constant":
            check_keys(cfg, required=("model", "length_m"), optional=("scale", "reference"), where=where)
            length = check_number(cfg["length_m"], f"{where}.length_m", minimum=0.0, strict_min=True)
            wl, coef = [self.wl_min, self.wl_max], [1.0 / length, 1.0 / length]
        elif model == "table":
            check_keys(
                cfg,
                required=("model", "wavelength_nm"),
                optional=("coefficient_per_m", "length_m", "scale", "reference"),
                where=where,
            )
            if ("coefficient_per_m" in cfg) == ("length_m" in cfg):
                raise ConfigError(f"{where}: give exactly one of 'coefficient_per_m' or 'length_m'")
            if "coefficient_per_m" in cfg:
                wl, coef = _table(cfg, where, "wavelength_nm", "coefficient_per_m")
            else:
                wl, ln = _table(cfg, where, "wavelength_nm", "length_m")
                coef = [1.0 / v for v in ln]
        else:
            raise ConfigError(f"{where}.model: got {model!r}, allowed: ['constant', 'table']")
        self.register_buffer("_abs_wl", torch.tensor(wl, dtype=torch.float64))
        self.register_buffer("_abs_coef", torch.tensor(coef, dtype=torch.float64))
        self.abs_scale = nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def _init_rayleigh(self, cfg: dict, where: str) -> None:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: got {cfg!r}, expected a mapping")
        model = cfg.get("model", "power_law")
        scale = check_number(cfg.get("scale", 1.0), f"{where}.scale", minimum=0.0, strict_min=True)
        self.rayleigh_model = model
        if model == "power_law":
            check_keys(
                cfg,
                required=("model", "b_per_m", "reference_nm"),
                optional=("exponent", "scale", "reference"),
                where=where,
            )
            self._ray_b0 = check_number(cfg["b_per_m"], f"{where}.b_per_m", minimum=0.0, strict_min=True)
            self._ray_l0 = check_number(
                cfg["reference_nm"], f"{where}.reference_nm", minimum=0.0, strict_min=True
            )
            self._ray_p = check_number(cfg.get("exponent", 4.0), f"{where}.exponent", minimum=0.0)
        elif model == "table":
            check_keys(
                cfg,
                required=("model", "wavelength_nm", "length_m"),
                optional=("scale", "reference"),
                where=where,
            )
            wl, ln = _table(cfg, where, "wavelength_nm", "length_m")
            self.register_buffer("_ray_wl", torch.tensor(wl, dtype=torch.float64))
            self.register_buffer("_ray_coef", torch.tensor([1.0 / v for v in ln], dtype=torch.float64))
        else:
            raise ConfigError(f"{where}.model: got {model!r}, allowed: ['power_law', 'table']")
        self.rayleigh_scale = nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def _init_mie(self, cfg: dict, where: str) -> None:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: got {cfg!r}, expected a mapping")
        check_keys(
            cfg,
            required=("enabled",),
            optional=("length_m", "reference_nm", "exponent", "g", "scale", "reference"),
            where=where,
        )
        if not isinstance(cfg["enabled"], bool):
            raise ConfigError(f"{where}.enabled: got {cfg['enabled']!r}, expected true or false")
        self.mie_enabled = cfg["enabled"]
        self._mie_l0 = check_number(
            cfg.get("length_m", 1.0e3), f"{where}.length_m", minimum=0.0, strict_min=True
        )
        self._mie_ref = check_number(
            cfg.get("reference_nm", 500.0), f"{where}.reference_nm", minimum=0.0, strict_min=True
        )
        self._mie_q = check_number(cfg.get("exponent", 0.0), f"{where}.exponent")
        g = check_number(cfg.get("g", 0.9), f"{where}.g", minimum=-1.0, maximum=1.0)
        if abs(g) >= 1.0:
            raise ConfigError(f"{where}.g: got {g!r}, allowed: -1 < g < 1")
        self.mie_g = g
        scale = check_number(cfg.get("scale", 1.0), f"{where}.scale", minimum=0.0, strict_min=True)
        self.mie_scale = nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def _init_material(self, cfg: dict, where: str) -> None:
        check_keys(
            cfg,
            required=("density_g_cm3", "z_over_a", "mean_excitation_ev", "radiation_length_m"),
            optional=("sternheimer", "reference"),
            where=where,
        )
        self.density = check_number(
            cfg["density_g_cm3"], f"{where}.density_g_cm3", minimum=0.0, strict_min=True
        )
        self.z_over_a = check_number(
            cfg["z_over_a"], f"{where}.z_over_a", minimum=0.0, strict_min=True, maximum=1.0
        )
        self.mean_excitation_ev = check_number(
            cfg["mean_excitation_ev"], f"{where}.mean_excitation_ev", minimum=0.0, strict_min=True
        )
        self.radiation_length = check_number(
            cfg["radiation_length_m"], f"{where}.radiation_length_m", minimum=0.0, strict_min=True
        )
        st = cfg.get("sternheimer")
        if st is None:
            self.sternheimer = self._sternheimer_peierls()
        else:
            check_keys(
                st,
                required=("a", "k", "x0", "x1", "cbar"),
                optional=("delta0",),
                where=f"{where}.sternheimer",
            )
            self.sternheimer = {
                k: check_number(st[k], f"{where}.sternheimer.{k}") for k in ("a", "k", "x0", "x1", "cbar")
            }
            self.sternheimer["delta0"] = check_number(
                st.get("delta0", 0.0), f"{where}.sternheimer.delta0", minimum=0.0
            )
            if self.sternheimer["x1"] <= self.sternheimer["x0"]:
                raise ConfigError(
                    f"{where}.sternheimer: x1 ({self.sternheimer['x1']}) must exceed x0 "
                    f"({self.sternheimer['x0']})"
                )

    def _sternheimer_peierls(self) -> dict[str, float]:
        """Sternheimer & Peierls (Phys. Rev. B 3 (1971) 3681) general coefficients for condensed media."""
        hw_p = 28.816 * math.sqrt(self.density * self.z_over_a)  # plasma energy [eV] (PDG eq. 34.6)
        cbar = 1.0 + 2.0 * math.log(self.mean_excitation_ev / hw_p)
        if self.mean_excitation_ev < 100.0:
            x0, x1 = (0.2, 2.0) if cbar <= 3.681 else (0.326 * cbar - 1.0, 2.0)
        else:
            x0, x1 = (0.2, 3.0) if cbar <= 5.215 else (0.326 * cbar - 1.5, 3.0)
        k = 3.0
        a = (cbar - 2 * math.log(10) * x0) / (x1 - x0) ** k
        return {"a": a, "k": k, "x0": x0, "x1": x1, "cbar": cbar, "delta0": 0.0}

    # ---- optics ------------------------------------------------------------------------------------------
    def _n_and_lambda_dn(self, wl: Tensor) -> tuple[Tensor, Tensor]:
        """n(lambda) and lambda dn/dlambda (analytic)."""
        if self.rindex_model == "constant":
            n = self._n_const.to(device=wl.device, dtype=wl.dtype).expand_as(wl)
            return n, torch.zeros_like(wl)
        if self.rindex_model == "sellmeier":
            # n^2 = 1 + sum_k B_k l2 / (l2 - C_k), summed term by term (no (..., K) broadcast temporaries)
            l2 = (wl * 1e-3) * (wl * 1e-3)  # um^2
            n2 = torch.ones_like(l2)
            dn2_dl2 = torch.zeros_like(l2)
            for b, c in self._sell_terms:
                inv = 1.0 / (l2 - c)
                n2 = n2 + (b * l2) * inv
                dn2_dl2 = dn2_dl2 - (b * c) * (inv * inv)
            n = torch.sqrt(n2)
            # lambda dn/dlambda = (l2 / n) d(n^2)/d(l2)
            return n, l2 * dn2_dl2 / n
        n, dn = _hermite_eval(wl, self._n_wl, self._n_val, self._n_tan)
        return n, wl * dn

    def refractive_index(self, wl: Tensor) -> Tensor:
        """Phase refractive index n(lambda); wl [nm] any shape."""
        if self.rindex_model == "sellmeier":  # n only (skips the dn/dlambda terms)
            l2 = (wl * 1e-3) * (wl * 1e-3)  # um^2
            n2 = torch.ones_like(l2)
            for b, c in self._sell_terms:
                n2 = n2 + (b * l2) / (l2 - c)
            return torch.sqrt(n2)
        return self._n_and_lambda_dn(wl)[0]

    def group_index(self, wl: Tensor) -> Tensor:
        """Group index n_g = n - lambda dn/dlambda (photon speed c/n_g); wl [nm]."""
        n, ldn = self._n_and_lambda_dn(wl)
        return n - ldn

    def absorption_length(self, wl: Tensor) -> Tensor:
        """Absorption length [m] = abs_scale / a(lambda), a linearly interpolated [1/m]."""
        coef = interp1d(wl, self._abs_wl, self._abs_coef)
        return self.abs_scale.to(wl.device) / coef

    def rayleigh_length(self, wl: Tensor) -> Tensor:
        """Rayleigh scattering length [m] = rayleigh_scale / b(lambda)."""
        if self.rayleigh_model == "power_law":
            b = self._ray_b0 * (wl / self._ray_l0) ** (-self._ray_p)
        else:
            b = interp1d(wl, self._ray_wl, self._ray_coef)
        return self.rayleigh_scale.to(wl.device) / b

    def mie_length(self, wl: Tensor) -> Tensor:
        """Mie scattering length [m] (Henyey-Greenstein phase function, asymmetry mie_g); inf when off."""
        if not self.mie_enabled:
            return torch.full_like(wl, float("inf"))
        return self.mie_scale.to(wl.device) * self._mie_l0 * (wl / self._mie_ref) ** self._mie_q

    def interpolation_knots(self) -> Tensor:
        """Wavelengths [nm] (K,) float64 of the knots of the tabulated quantities (absorption, and the
        Rayleigh and refractive-index tables when those models are tables): where the interpolated laws
        change slope or curvature. Look-up grids that contain them reproduce the piecewise-linear tables
        exactly (physics.transport_cpu.medium_table)."""
        parts = [self._abs_wl] + [getattr(self, n) for n in ("_ray_wl", "_n_wl") if hasattr(self, n)]
        return torch.cat([p.detach().to(torch.float64).cpu() for p in parts])

    def attenuation_length(self, wl: Tensor) -> Tensor:
        """Total attenuation length [m]: 1 / (1/L_abs + 1/L_ray + 1/L_mie)."""
        return 1.0 / (
            1.0 / self.absorption_length(wl) + 1.0 / self.rayleigh_length(wl) + 1.0 / self.mie_length(wl)
        )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, wl=[{self.wl_min}, {self.wl_max}] nm, n={self.rindex_model}, "
            f"mie={'on' if self.mie_enabled else 'off'}"
        )


# ----------------------------------------------------------------------------------------------------------
# Scintillator
# ----------------------------------------------------------------------------------------------------------
class Scintillator(Medium):
    """Liquid scintillator: a Medium plus scintillation light.

    * light_yield [photons/MeV] with Birks' law dL/dx = Y (dE/dx) / (1 + kB dE/dx) (Birks, Proc. Phys. Soc.
      A 64 (1951) 874); birks_kb [m/MeV].
    * Emission time: sum of components w_i (exp(-t/tau_i) - exp(-t/tau_r)) / (tau_i - tau_r); each component
      is the convolution of a rise exponential (tau_r) and a decay exponential (tau_i), so
      t = -tau_i ln u1 - tau_r ln u2 is an exact sample.
    * Emission spectrum: tabulated intensity per nm, piecewise linear; sampled by exact inversion of its
      piecewise-quadratic CDF.
    """

    def __init__(self, config: dict[str, Any], *, where: str = "scintillator") -> None:
        super().__init__(config, where=where)
        sc = config.get("scintillation")
        w = f"{where}.scintillation"
        check_keys(
            sc,
            required=(
                "light_yield_per_mev",
                "birks_kb_m_per_mev",
                "rise_time_ns",
                "decay_times_ns",
                "decay_weights",
                "emission_spectrum",
            ),
            optional=("reference",),
            where=w,
        )
        self.light_yield = check_number(sc["light_yield_per_mev"], f"{w}.light_yield_per_mev", minimum=0.0)
        self.birks_kb = check_number(sc["birks_kb_m_per_mev"], f"{w}.birks_kb_m_per_mev", minimum=0.0)
        self.rise_time = check_number(sc["rise_time_ns"], f"{w}.rise_time_ns", minimum=0.0)
        taus = _number_list(sc["decay_times_ns"], f"{w}.decay_times_ns", minimum=0.0, strict_min=True)
        if any(abs(t - self.rise_time) < 1e-9 for t in taus):
            raise ConfigError(f"{w}.rise_time_ns: got {self.rise_time!r}, must differ from every decay time")
        wts = _number_list(sc["decay_weights"], f"{w}.decay_weights", n=len(taus), minimum=0.0)
        if sum(wts) <= 0:
            raise ConfigError(f"{w}.decay_weights: got {wts!r}, expected a positive sum")
        self.register_buffer("decay_times", torch.tensor(taus, dtype=torch.float64))
        self.register_buffer("decay_weights", torch.tensor(wts, dtype=torch.float64) / sum(wts))
        es = sc["emission_spectrum"]
        check_keys(es, required=("wavelength_nm", "intensity"), where=f"{w}.emission_spectrum")
        x, y = _table(es, f"{w}.emission_spectrum", "wavelength_nm", "intensity", strict=False)
        if sum(y) <= 0:
            raise ConfigError(f"{w}.emission_spectrum.intensity: expected a positive total")
        xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        cdf = torch.cat([xt.new_zeros(1), torch.cumsum(0.5 * (yt[1:] + yt[:-1]) * (xt[1:] - xt[:-1]), 0)])
        self.register_buffer("_em_wl", xt)
        self.register_buffer("_em_y", yt)
        self.register_buffer("_em_cdf", cdf / cdf[-1])
        self._em_norm = float(cdf[-1])

    def emission_pdf(self, wl: Tensor) -> Tensor:
        """Normalised emission spectrum density [1/nm] (0 outside the table)."""
        inside = (wl >= self._em_wl[0]) & (wl <= self._em_wl[-1])
        return torch.where(
            inside, interp1d(wl, self._em_wl, self._em_y) / self._em_norm, torch.zeros_like(wl)
        )

    def sample_wavelength(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Wavelengths [nm] (n,) from the emission spectrum (exact inverse of the piecewise-linear pdf)."""
        return sample_piecewise_linear(self._em_wl, self._em_y, n, generator, device=device, dtype=dtype)

    def sample_emission_time(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Emission delays [ns] (n,) from the multi-component rise/decay profile (exact)."""
        dev = _device_of(generator, device)
        comp = torch.multinomial(self.decay_weights.to(dev), n, replacement=True, generator=generator)
        tau = self.decay_times.to(dev)[comp]
        u = torch.rand(2, n, generator=generator, device=dev, dtype=torch.float64).clamp_min(1e-300)
        t = -tau * torch.log(u[0]) - self.rise_time * torch.log(u[1])
        return t.to(dtype)

    def emission_time_pdf(self, t: Tensor) -> Tensor:
        """Density of the emission delay [1/ns]: sum_i w_i (e^{-t/tau_i} - e^{-t/tau_r}) / (tau_i - tau_r)."""
        tau = self.decay_times.to(device=t.device, dtype=t.dtype)
        w = self.decay_weights.to(device=t.device, dtype=t.dtype)
        tt = t.unsqueeze(-1).clamp_min(0)
        tr = self.rise_time
        if tr > 0:
            comp = (torch.exp(-tt / tau) - torch.exp(-tt / tr)) / (tau - tr)
        else:
            comp = torch.exp(-tt / tau) / tau
        return torch.where(t >= 0, (w * comp).sum(-1), torch.zeros_like(t))

    def birks_yield(self, de: Tensor, dedx: Tensor) -> Tensor:
        """Mean scintillation photons for energy deposit de [MeV] at stopping power dedx [MeV/m]."""
        return self.light_yield * de / (1.0 + self.birks_kb * dedx)
