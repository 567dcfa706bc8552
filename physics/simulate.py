"""End-to-end Monte-Carlo simulation: particle or source → photons → p.e. → hits → waveforms → HDF5.

Stages (design §3): emission (physics.emission) → optics (physics.optics) → sensors (physics.sensors)
→ electronics (physics.electronics). Events are processed in batches; every random draw comes from one
seeded ``torch.Generator`` so a run is reproducible from (config, seed).

Photon pre-thinning: Cherenkov/source photons are generated with probability ``thin`` equal to the upper
bound of the PMT detection probability (QE × CE × acceptance); the sensor stage accepts each photocathode
hit with probability p/thin. This is statistically identical to generating every photon (WCSim does the
same) and cuts the optics work by ~1/thin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from . import __version__
from .config import ConfigError, check_choice, check_number
from .constants import SHOWER_PARTICLES, TRACK_PARTICLES
from .electronics import Electronics
from .emission import (
    cherenkov_photons,
    isotropic_source,
    laser_source,
    scintillation_photons,
    shower_photons,
    track_steps,
)
from .geometry import Detector
from .medium import Medium, Scintillator
from .optics import Optics
from .records import Hits, PhotoElectrons, Photons

SOURCES = ("isotropic", "laser")
PARTICLES = TRACK_PARTICLES + SHOWER_PARTICLES + SOURCES


@dataclass
class SimConfig:
    """What to simulate. Lengths m, energies MeV (kinetic), times ns.

    vertex/direction: a fixed 3-vector, or None for random (uniform in the fiducial volume / isotropic).
    For sources ``n_photons`` is the mean photon count per event and ``energy`` is ignored.
    """

    detector: str = "wcte"
    medium: str = "water"
    sensors: str = "auto"
    electronics: str = "default"
    optics: dict = field(default_factory=dict)
    particle: str = "mu-"
    energy: float = 500.0
    vertex: Sequence[float] | None = None
    direction: Sequence[float] | None = None
    fiducial_margin: float = 0.5
    n_photons: float = 1.0e5
    laser_divergence_deg: float = 1.0
    wavelength_nm: float = 405.0
    waveforms: bool = False
    keep_photons: bool = False
    dark_window_ns: tuple[float, float] = (-100.0, 400.0)

    def validate(self) -> None:
        check_choice(self.particle, "particle", PARTICLES)
        check_number(self.energy, "energy [MeV]", minimum=0.0, strict_min=True)
        check_number(self.n_photons, "n_photons", minimum=0.0)
        check_number(self.fiducial_margin, "fiducial_margin [m]", minimum=0.0)
        for name in ("vertex", "direction"):
            v = getattr(self, name)
            if v is not None:
                if len(v) != 3:
                    raise ConfigError(f"{name}: got {list(v)!r}, expected 3 numbers or None (random)")
                for i, x in enumerate(v):
                    check_number(x, f"{name}[{i}]")
        if self.direction is not None and math.hypot(*self.direction) == 0.0:
            raise ConfigError(f"direction: got {list(self.direction)!r}, expected a non-zero vector")


def _sensor_config_for(detector: Detector) -> str:
    """Default PMT model: 20-inch PMTs (photocathode radius ≥ 10 cm) or 3-inch PMTs."""
    return "20inch" if float(detector.pmt_radius.max()) >= 0.10 else "default"


class Simulator:
    """Full MC chain for one detector. ``device`` is where all stages run."""

    def __init__(self, cfg: SimConfig, device: str | torch.device = "cpu") -> None:
        from .sensors import PMTResponse

        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        self.detector = Detector.load(cfg.detector).to(self.device)
        self.medium = Medium.load(cfg.medium).to(self.device)
        self.optics = Optics.from_config(cfg.optics).to(self.device)
        sensors = cfg.sensors if cfg.sensors != "auto" else _sensor_config_for(self.detector)
        self.sensors = PMTResponse.load(sensors, n_pmts=self.detector.n_pmts).to(self.device)
        self.electronics = Electronics.load(cfg.electronics).to(self.device) if cfg.waveforms else None
        self._given: tuple[Tensor, Tensor] | None = None
        if cfg.vertex is not None and not bool(
            self.detector.inside(torch.tensor([cfg.vertex], dtype=torch.float32, device=self.device))[0]
        ):
            raise ConfigError(
                f"vertex: got {list(cfg.vertex)!r} [m], which is outside detector {self.detector.name!r}"
            )

    def _kinematics(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        dev, cfg = self.device, self.cfg
        if self._given is not None:  # per-event kinematics passed to run()
            v, d = self._given
            self._given = (v[n:], d[n:])
            return v[:n].to(dev), d[:n].to(dev) / d[:n].to(dev).norm(dim=1, keepdim=True)
        if cfg.vertex is None:
            vtx = self.detector.sample_fiducial(n, gen, margin=cfg.fiducial_margin)
        else:
            vtx = torch.tensor(cfg.vertex, dtype=torch.float32, device=dev).expand(n, 3).clone()
        if cfg.direction is None:
            d = torch.randn(n, 3, generator=gen, device=dev)
        else:
            d = torch.tensor(cfg.direction, dtype=torch.float32, device=dev).expand(n, 3).clone()
        return vtx, d / d.norm(dim=1, keepdim=True)

    def _photons(
        self, vtx: Tensor, d: Tensor, thin: float, gen: torch.Generator
    ) -> tuple[Photons, Tensor | None]:
        """Emitted photons and their linear polarisation (N,3) (None: unpolarised). Cherenkov light is
        polarised in the plane of the photon and its radiating particle (emission.cherenkov_polarization:
        each step's direction for tracks, the cascade axis for showers); scintillation and calibration-source
        light is unpolarised (zero rows / None: the optics draws a random polarisation)."""
        cfg = self.cfg
        if cfg.particle in TRACK_PARTICLES:
            if isinstance(self.medium, Scintillator):  # Cherenkov + Birks-quenched scintillation to rest
                steps = track_steps(cfg.particle, cfg.energy, vtx, d, self.medium, gen, stop="rest")
                ch, pol = cherenkov_photons(steps, self.medium, gen, thin=thin, with_polarization=True)
                sc = scintillation_photons(steps, self.medium, gen, cfg.particle, thin=thin)
                return Photons.cat([ch, sc]), torch.cat([pol, torch.zeros_like(sc.dir)])
            steps = track_steps(cfg.particle, cfg.energy, vtx, d, self.medium, gen)
            return cherenkov_photons(steps, self.medium, gen, thin=thin, with_polarization=True)
        if cfg.particle in SHOWER_PARTICLES:
            return shower_photons(
                cfg.particle, cfg.energy, vtx, d, self.medium, gen, thin=thin, with_polarization=True
            )
        # calibration sources: Poisson(n_photons * thin) photons per event at one wavelength, t = 0
        mean, wl = cfg.n_photons * thin, cfg.wavelength_nm
        if cfg.particle == "isotropic":
            return isotropic_source(vtx, mean, gen, poisson=True, wavelength=wl), None
        div = math.radians(cfg.laser_divergence_deg)
        return laser_source(vtx, d, mean, gen, divergence=div, poisson=True, wavelength=wl), None

    @torch.no_grad()
    def run_batch(self, n_events: int, gen: torch.Generator) -> dict:
        """Simulate ``n_events`` events; returns truth, hits, per-p.e. data and (optionally) waveforms."""
        vtx, d = self._kinematics(n_events, gen)
        thin = float(self.sensors.max_detection_probability())
        photons, pol = self._photons(vtx, d, thin, gen)
        cathode = self.optics.sample(photons, self.detector, self.medium, gen, polarization=pol)
        pe = self.sensors.detect(cathode, gen, thin=thin)
        if self.sensors.dark_rate_hz > 0:
            pe = PhotoElectrons.cat([pe, self.sensors.dark_noise(n_events, self.cfg.dark_window_ns, gen)])
        hits, pe_digi = self.sensors.digitize(pe, n_events, gen)
        out = {
            "truth": {
                "vertex": vtx,
                "direction": d,
                "energy": torch.full((n_events,), self.cfg.energy, device=self.device),
                # emitted photons (the thinned count scaled back: an unbiased estimate)
                "n_photons": torch.bincount(photons.event, minlength=n_events) / thin,
                "n_pe": torch.bincount(pe.event, minlength=n_events),
            },
            "hits": hits,
        }
        if self.cfg.keep_photons:
            out["photons"] = cathode
        if self.electronics is not None:
            out["waveforms"] = self._waveforms(hits, pe_digi, gen)
        return out

    def _waveforms(self, hits: Hits, pe_digi: dict, gen: torch.Generator) -> dict:
        """One waveform per hit (event, PMT); sample k at t_start - pre_trigger + k * period [ns]."""
        key_hit = hits.event * self.detector.n_pmts + hits.pmt
        key_pe = pe_digi["event"] * self.detector.n_pmts + pe_digi["pmt"]
        if len(hits) == 0:  # no hit above threshold: no channel to digitise
            found = torch.zeros_like(key_pe, dtype=torch.bool)
            channel = key_pe[found]
        else:  # p.e. of PMTs below threshold have no channel and are dropped
            order = torch.argsort(key_hit)
            pos = torch.searchsorted(key_hit[order], key_pe).clamp(max=len(key_hit) - 1)
            found = key_hit[order][pos] == key_pe
            channel = order[pos][found]
        t_start = hits.time  # the window opens pre_trigger before the first hit (electronics convention)
        samples = self.electronics.sample(
            channel, pe_digi["t"][found], pe_digi["charge"][found], len(hits), t_start, gen
        )
        return {
            "samples": samples,
            "event": hits.event,
            "pmt": hits.pmt,
            "t_start": t_start,
            "sampling_ns": self.electronics.sampling_period,
        }

    def run(
        self,
        n_events: int,
        seed: int,
        batch_size: int = 16,
        progress: bool = False,
        vertices: Tensor | None = None,
        directions: Tensor | None = None,
    ) -> dict:
        """Simulate ``n_events`` events in batches; returns concatenated truth, hits and extras.

        vertices, directions: optional per-event (n_events, 3) kinematics [m] / (any norm), used instead of
        the config's fixed or random ones (both must be given together).
        """
        check_number(n_events, "events", minimum=1, integer=True)
        check_number(seed, "seed", minimum=0, integer=True)
        check_number(batch_size, "batch_size", minimum=1, integer=True)
        self._given = None
        if (vertices is None) != (directions is None):
            raise ConfigError("vertices/directions: give both per-event tensors or neither")
        if vertices is not None:
            for name, t in (("vertices", vertices), ("directions", directions)):
                if tuple(t.shape) != (n_events, 3):
                    raise ConfigError(f"{name}: got shape {tuple(t.shape)}, expected ({n_events}, 3)")
            if not bool(self.detector.inside(vertices.to(self.device, torch.float32)).all()):
                raise ConfigError(
                    f"vertices: some lie outside detector {self.detector.name!r}; allowed: points inside it"
                )
            if bool((directions.norm(dim=1) == 0).any()):
                raise ConfigError("directions: got a zero vector, expected non-zero directions")
            self._given = (vertices.float(), directions.float())
        gen = torch.Generator(device=self.device).manual_seed(seed)
        parts = []
        starts = range(0, n_events, batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, total=len(starts), unit="batch", desc="simulate")
        for s in starts:
            b = self.run_batch(min(batch_size, n_events - s), gen)
            for rec in ("hits", "photons"):
                if rec in b:
                    b[rec].event += s
            if "waveforms" in b:
                b["waveforms"]["event"] = b["waveforms"]["event"] + s
            parts.append(b)
        return _merge(parts)

    def config_dict(self) -> dict:
        """Everything the run was made with: the request and the resolved configuration of every stage, with
        the current values of the medium's scale parameters (``medium_scales``: calibrated or edited after
        construction, e.g. rayleigh_scale = inf for direct light only), of the optics' reflectivities and of
        the sensors' scalar settings (the PMT table and the per-PMT sensor values are written beside it by
        :func:`physics.io.write_run`)."""
        det = self.detector
        return {
            "simulation": asdict(self.cfg),
            "version": __version__,
            "detector": {
                "name": det.name,
                "shape": det.shape,
                "radius_m": det.radius,
                "height_m": det.height,
                "n_pmts": det.n_pmts,
                "photocoverage": det.photocoverage,
            },
            "medium": self.medium.config,
            "medium_scales": self.medium.scales(),
            "optics": {
                "wall_reflectivity": float(self.optics.wall_reflectivity.detach()),
                "diffuse_fraction": float(self.optics.diffuse_fraction.detach()),
                "pmt_reflectivity": float(self.optics.pmt_reflectivity.detach()),
                "max_rounds": self.optics.max_rounds,
            },
            "sensors": self.sensors.current_config(),
            "electronics": None if self.electronics is None else self.electronics.config,
        }


def _merge(parts: list[dict]) -> dict:
    out = {"truth": {k: torch.cat([p["truth"][k] for p in parts]) for k in parts[0]["truth"]}}
    out["hits"] = Hits.cat([p["hits"] for p in parts])
    if "photons" in parts[0]:
        out["photons"] = type(parts[0]["photons"]).cat([p["photons"] for p in parts])
    if "waveforms" in parts[0]:
        w0 = parts[0]["waveforms"]
        keys = [k for k in w0 if k != "sampling_ns"]
        out["waveforms"] = {k: torch.cat([p["waveforms"][k] for p in parts]) for k in keys}
        out["waveforms"]["sampling_ns"] = w0["sampling_ns"]
    return out
