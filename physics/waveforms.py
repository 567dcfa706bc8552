"""Labelled single-channel waveform data sets (training/evaluation data for the CBAE, arXiv:2203.04604).

Each waveform is one channel of :class:`physics.electronics.Electronics` with t_start = 0, so sample k is
at time -pre_trigger + k * sampling_period [ns]. Physical parameters per waveform: the primary pulse charge
[p.e.] (uniform in ``charge_range``) and arrival time [ns] (uniform in ``time_range``); optional pile-up of
extra pulses (Poisson number with mean ``pileup_mean``, uniform times in ``time_range`` and charges in
``charge_range``); a per-waveform noise scale (uniform in ``noise_range``) multiplying both noise sigmas.

HDF5 layout (group ``waveforms``): ``adc`` (n,S) int16/int32 [ADC counts], ``clean`` (n,S) float32 [ADC],
``charge`` (n,) [p.e.], ``time`` (n,) [ns], ``noise_scale`` (n,), ``pulse_charge``/``pulse_time`` (n,P)
(padded with 0/NaN), ``n_pulses`` (n,), ``sample_times`` (S,) [ns]; attributes: ``units`` (JSON),
``electronics`` (config JSON), ``generator`` (JSON of arguments), ``seed``, ``version``. Written to a
temporary file and renamed (atomic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from physics import __version__
from physics.config import ConfigError, check_choice, check_number
from physics.electronics import Electronics

NOISE_LEVELS: dict[str, float] = {"none": 0.0, "low": 0.3, "medium": 1.0, "high": 3.0}
UNITS = {
    "adc": "ADC counts",
    "clean": "ADC counts (analogue, before noise/quantisation)",
    "charge": "p.e.",
    "time": "ns",
    "pulse_charge": "p.e.",
    "pulse_time": "ns",
    "sample_times": "ns",
    "noise_scale": "factor on the config noise sigmas",
}


PRIORS = ("uniform", "log", "mixed")  # how simulate_waveforms draws charges and noise scales in their ranges


def noise_range(noise: str | float | Sequence[float]) -> tuple[float, float]:
    """Parse a noise spec: level name (:data:`NOISE_LEVELS`), a scale factor, or a [lo, hi] range."""
    if isinstance(noise, str):
        if noise in NOISE_LEVELS:
            return NOISE_LEVELS[noise], NOISE_LEVELS[noise]
        try:
            parts = [float(x) for x in noise.split(":")]
        except ValueError:
            raise ConfigError(
                f"noise: got {noise!r}, allowed: {list(NOISE_LEVELS)}, a number, or 'lo:hi'"
            ) from None
        noise = parts if len(parts) > 1 else parts[0]
    if isinstance(noise, int | float):
        v = check_number(noise, "noise", minimum=0.0)
        return v, v
    if len(noise) != 2:
        raise ConfigError(f"noise: got {noise!r}, allowed: a level, a number or a [lo, hi] pair")
    lo, hi = (check_number(x, "noise", minimum=0.0) for x in noise)
    if hi < lo:
        raise ConfigError(f"noise: got range {noise!r}, allowed: lo <= hi")
    return lo, hi


def _range(v: Sequence[float], field: str, minimum: float | None = None) -> tuple[float, float]:
    if not isinstance(v, Sequence) or len(v) != 2:
        raise ConfigError(f"{field}: got {v!r}, allowed: a [lo, hi] pair")
    lo, hi = (check_number(x, field, minimum=minimum) for x in v)
    if hi < lo:
        raise ConfigError(f"{field}: got {list(v)!r}, allowed: lo <= hi")
    return lo, hi


def simulate_waveforms(
    electronics: Electronics,
    n: int,
    generator: torch.Generator,
    charge_range: Sequence[float] = (0.5, 30.0),
    time_range: Sequence[float] = (-5.0, 40.0),
    noise: str | float | Sequence[float] = "medium",
    pileup_mean: float = 0.0,
    max_pulses: int = 4,
    charge_prior: str = "uniform",
    noise_prior: str = "uniform",
) -> dict[str, Tensor]:
    """Draw ``n`` labelled waveforms; returns a dict of CPU tensors (see module docstring for fields).

    charge_prior / noise_prior: how charges [p.e.] and noise scales are drawn in their ranges: "uniform",
    "log" (log-uniform: equal numbers per decade; needs lo > 0) or "mixed" (each draw uniform or
    log-uniform with probability 1/2). A training set drawn log-uniformly in charge puts ~10x more dim
    pulses into the dim, quiet corner that a uniform draw leaves nearly empty; "mixed" keeps half of
    the bright ones.
    Vectorised over waveforms and pulses (one ``Electronics.expect`` call with n*P rows).
    """
    n = check_number(n, "n", minimum=1, integer=True)
    qlo, qhi = _range(charge_range, "charge_range", minimum=0.0)
    tlo, thi = _range(time_range, "time_range")
    nlo, nhi = noise_range(noise)
    pileup_mean = check_number(pileup_mean, "pileup_mean", minimum=0.0)
    P = check_number(max_pulses, "max_pulses", minimum=1, maximum=64, integer=True)
    dev = electronics.device
    dt = torch.float64

    for field, prior, lo in (("charge_prior", charge_prior, qlo), ("noise_prior", noise_prior, nlo)):
        check_choice(prior, field, PRIORS)
        if prior != "uniform" and not lo > 0:
            raise ConfigError(f"{field}: {prior!r} needs a range with lo > 0, got lo = {lo!r}")

    def u(lo: float, hi: float, *shape: int, prior: str = "uniform") -> Tensor:
        r = torch.rand(*shape, generator=generator, device=dev, dtype=dt)
        if prior == "uniform":
            return lo + (hi - lo) * r
        log_u = lo * (hi / lo) ** r
        if prior == "log":
            return log_u
        pick = torch.rand(*shape, generator=generator, device=dev, dtype=dt) < 0.5
        return torch.where(pick, log_u, lo + (hi - lo) * r)

    q = u(qlo, qhi, n, P, prior=charge_prior)
    t = u(tlo, thi, n, P)
    if pileup_mean > 0 and P > 1:
        extra = torch.poisson(torch.full((n,), pileup_mean, dtype=dt, device=dev), generator=generator)
        npulse = 1 + extra.clamp(max=P - 1).long()
    else:
        npulse = torch.ones(n, dtype=torch.long, device=dev)
    valid = torch.arange(P, device=dev)[None, :] < npulse[:, None]
    scale = u(nlo, nhi, n, prior=noise_prior)
    ch = torch.arange(n, device=dev)[:, None].expand(n, P)
    clean = electronics.expect(ch[valid], t[valid], q[valid], n)
    adc = electronics.digitise(clean + electronics.noise(n, generator, scale, dt))
    return {
        "adc": adc.cpu(),
        "clean": clean.float().cpu(),
        "charge": q[:, 0].float().cpu(),
        "time": t[:, 0].float().cpu(),
        "noise_scale": scale.float().cpu(),
        "n_pulses": npulse.int().cpu(),
        "pulse_charge": torch.where(valid, q, 0.0).float().cpu(),
        "pulse_time": torch.where(valid, t, float("nan")).float().cpu(),
        "sample_times": electronics.sample_offsets(torch.float64, dev).float().cpu(),
    }


def write_waveforms(
    path: str | os.PathLike,
    data: dict[str, Tensor],
    electronics: Electronics,
    generator_args: dict[str, Any] | None = None,
    seed: int | None = None,
    extra: dict[str, np.ndarray | Tensor] | None = None,
    group: str = "waveforms",
) -> Path:
    """Write a waveform set (dict from :func:`simulate_waveforms`, plus ``extra`` arrays) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    arrays = {**data, **(extra or {})}
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group(group)
            for k, v in arrays.items():
                a = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
                if a.ndim == 2 and a.shape[0] > 1:
                    g.create_dataset(k, data=a, chunks=(min(a.shape[0], 4096), a.shape[1]), compression="lzf")
                else:
                    g.create_dataset(k, data=a)
            g.attrs["units"] = json.dumps({k: UNITS[k] for k in arrays if k in UNITS})
            g.attrs["electronics"] = electronics.config_json()
            g.attrs["generator"] = json.dumps(generator_args or {})
            g.attrs["seed"] = -1 if seed is None else int(seed)
            g.attrs["version"] = __version__
            g.attrs["n_waveforms"] = int(next(iter(arrays.values())).shape[0])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_waveform_file(
    path: str | os.PathLike,
    electronics: str | Electronics = "default",
    n: int = 10000,
    seed: int = 0,
    chunk: int = 50000,
    **kwargs: Any,
) -> Path:
    """Simulate ``n`` waveforms (in chunks, one seeded generator) and write them to ``path``."""
    el = Electronics.load(electronics) if isinstance(electronics, str | Path) else electronics
    g = torch.Generator(device=el.device).manual_seed(int(seed))
    parts = [simulate_waveforms(el, min(chunk, n - i), g, **kwargs) for i in range(0, n, chunk)]
    data = {k: (torch.cat([p[k] for p in parts]) if k != "sample_times" else parts[0][k]) for k in parts[0]}
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return write_waveforms(path, data, el, {"n": n, **args}, seed)


def read_waveforms(
    path: str | os.PathLike, group: str = "waveforms"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a whole waveform file: (dict of tensors, attributes with JSON fields decoded)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"waveform file: {str(p)!r} does not exist")
    with h5py.File(p, "r") as f:
        if group not in f:
            raise ConfigError(f"waveform file {str(p)!r}: no group {group!r} (found {list(f)})")
        g = f[group]
        data = {k: torch.from_numpy(g[k][...]) for k in g}
        attrs = {
            k: (json.loads(v) if k in ("units", "electronics", "generator") else v)
            for k, v in g.attrs.items()
        }
    return data, attrs


class WaveformDataset(torch.utils.data.Dataset):
    """Lazy map-style dataset over a waveform file: item i -> dict(adc (S,) float32, clean (S,),
    params (2,) [charge p.e., time ns], labelled bool).

    The HDF5 file is opened on first access in each process (DataLoader workers each open their own
    handle; the handle is dropped when pickled). ``__getitems__`` reads a whole batch with one sorted
    h5py selection. ``label_mask`` (n,) bool marks which items carry labels (semi-supervised training).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        indices: np.ndarray | None = None,
        label_mask: np.ndarray | None = None,
        group: str = "waveforms",
    ):
        self.path = str(path)
        self.group = group
        if not Path(self.path).is_file():
            raise ConfigError(f"waveform file: {self.path!r} does not exist")
        with h5py.File(self.path, "r") as f:
            if group not in f:
                raise ConfigError(f"waveform file {self.path!r}: no group {group!r}")
            n = int(f[group]["adc"].shape[0])
            self.n_samples = int(f[group]["adc"].shape[1])
            self.electronics = json.loads(f[group].attrs["electronics"])
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.label_mask = (
            np.ones(len(self.indices), bool) if label_mask is None else np.asarray(label_mask, dtype=bool)
        )
        if len(self.label_mask) != len(self.indices):
            raise ConfigError(f"label_mask: length {len(self.label_mask)}, expected {len(self.indices)}")
        self._h5: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = None
        return state

    def _group(self) -> h5py.Group:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5[self.group]

    def _read(self, pos: np.ndarray) -> dict[str, Tensor]:
        idx = self.indices[pos]
        order = np.argsort(idx)
        sidx = idx[order]
        uniq, inv = np.unique(sidx, return_inverse=True)
        g = self._group()
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 4 * len(uniq) + 64:  # dense: one contiguous read
            sel = {k: g[k][lo:hi][uniq - lo] for k in ("adc", "clean", "charge", "time")}
        else:
            sel = {k: g[k][uniq] for k in ("adc", "clean", "charge", "time")}
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        take = inv[back]
        return {
            "adc": torch.from_numpy(sel["adc"][take].astype(np.float32)),
            "clean": torch.from_numpy(sel["clean"][take].astype(np.float32)),
            "params": torch.from_numpy(
                np.stack([sel["charge"][take], sel["time"][take]], -1).astype(np.float32)
            ),
            "labelled": torch.from_numpy(self.label_mask[pos]),
        }

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self._read(np.asarray([i])).items()}

    def __getitems__(self, items: list[int]) -> dict[str, Tensor]:
        return self._read(np.asarray(items, dtype=np.int64))


def collate_batch(batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """DataLoader collate_fn: passes through the dict from ``__getitems__`` or stacks per-item dicts."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
