"""Flat, batched records passed between simulator stages.

Every record holds flat tensors over many events; ``event`` (long, shape (N,)) says which event of the
batch each row belongs to. Units: positions m, times ns, wavelengths nm, energies MeV, charge p.e.
All tensors of one record live on one device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


class _Record:
    """Common helpers: length, device move, row selection and concatenation."""

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).shape[0])

    def to(self, device: torch.device | str):
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: Tensor):
        """Rows ``index`` (bool mask or long indices) of every field."""
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list):
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


@dataclass
class TrackSteps(_Record):
    """Straight charged-track segments that radiate Cherenkov (or scintillation) light.

    x0, x1: (N, 3) segment start/end [m]; beta0, beta1: (N,) speed at start/end;
    t0: (N,) time at start [ns]; n_photons: (N,) expected photons from the segment (mean, not sampled);
    event: (N,) long.
    """

    x0: Tensor
    x1: Tensor
    beta0: Tensor
    beta1: Tensor
    t0: Tensor
    n_photons: Tensor
    event: Tensor


@dataclass
class Photons(_Record):
    """Optical photons. pos (N,3) [m], dir (N,3) unit, t (N,) [ns], wavelength (N,) [nm], event (N,) long."""

    pos: Tensor
    dir: Tensor
    t: Tensor
    wavelength: Tensor
    event: Tensor


@dataclass
class WallHits(_Record):
    """Photons arriving at the detector wall (for validation against tracked Geant4 runs).

    pos (N,3) [m], dir (N,3), t (N,) [ns], wavelength (N,) [nm], event (N,) long,
    n_scatter (N,) long: number of scatters (0 = direct light), n_reflect (N,) long.
    """

    pos: Tensor
    dir: Tensor
    t: Tensor
    wavelength: Tensor
    event: Tensor
    n_scatter: Tensor
    n_reflect: Tensor


@dataclass
class CathodeHits(_Record):
    """Photons absorbed in a PMT photocathode (before quantum efficiency).

    pmt (N,) long, t (N,) [ns], wavelength (N,) [nm], cos_incidence (N,) = -dir . inward_normal
    (1 = head-on), event (N,) long, indirect (N,) bool (scattered or reflected before arrival).
    """

    pmt: Tensor
    t: Tensor
    wavelength: Tensor
    cos_incidence: Tensor
    event: Tensor
    indirect: Tensor


@dataclass
class PhotoElectrons(_Record):
    """Photoelectrons: pmt (N,) long, t (N,) [ns] at the photocathode (before TTS), event (N,) long,
    dark (N,) bool (True for dark-noise p.e.)."""

    pmt: Tensor
    t: Tensor
    event: Tensor
    dark: Tensor


@dataclass
class Hits(_Record):
    """Digitised PMT hits, one row per hit PMT per event: pmt (N,) long, charge (N,) [p.e.],
    time (N,) [ns] first-hit time after TTS/offsets, event (N,) long."""

    pmt: Tensor
    charge: Tensor
    time: Tensor
    event: Tensor


def event_offsets(event: Tensor, n_events: int) -> Tensor:
    """CSR offsets (n_events+1,) for rows sorted by ``event``."""
    counts = torch.bincount(event, minlength=n_events)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
