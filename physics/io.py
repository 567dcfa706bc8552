"""HDF5 run files (design §6): one group per run, atomic writes, torch tensors on read.

Layout of a file (h5py)::

    /                       attrs: format='photonfit-run', format_version
    /<run>                  attrs: config (JSON string), seed, version (physics.__version__),
                                   created (UTC ISO), n_events, format_version
    /<run>/truth/<key>      (n_events, ...) per-event truth, attr 'unit'
    /<run>/hits/{pmt, charge, time, event}   flat (N,) arrays sorted by event; offsets (n_events+1,) CSR
    /<run>/photons/<field>  optional photon-level record (attr record_type: Photons, CathodeHits, ...)
    /<run>/waveforms/{samples (C,S) chunked+gzip, event, pmt, t_start}   attr sampling_ns
    /<run>/detector/{pmt_pos, pmt_normal, pmt_radius}   attrs name, shape, radius, height
    /<run>/sensors/{qe_scale, gain, time_offset}   optional per-PMT sensor values (P,) the run was made with

Every dataset carries a 'unit' attribute (m, ns, nm, MeV, p.e., 'ADC counts' or '1' for dimensionless/index).

Atomicity: a file is always written to a temporary name in the same folder (``.<name>.<random>.tmp``) and
moved into place with ``os.replace`` (atomic on POSIX) once complete; on any exception (KeyboardInterrupt
included) the temporary file is removed and the exception re-raised, so an interrupted write leaves neither
a partial file nor a temporary file. Appending a run to an existing file copies it to the temporary name,
adds the group there and replaces the original, so the original is untouched until the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

import physics
from physics import records as _records
from physics.config import ConfigError
from physics.records import Hits, event_offsets
from physics.sensors import PER_PMT_UNITS, check_per_pmt_values

FORMAT_NAME = "photonfit-run"
FORMAT_VERSION = "1.0"

#: units of well-known per-event truth keys (others must be given through ``truth_units``)
TRUTH_UNITS: dict[str, str] = {
    "vertex": "m",
    "position": "m",
    "pos": "m",
    "direction": "1",
    "dir": "1",
    "energy": "MeV",
    "kinetic_energy": "MeV",
    "momentum": "MeV",
    "time": "ns",
    "t0": "ns",
    "t": "ns",
    "wavelength": "nm",
    "particle": "1",
    "pdg": "1",
    "n_photons": "1",
    "n_pe": "p.e.",
    "charge": "p.e.",
    "event": "1",
    "source_intensity": "1",
    "divergence": "rad",
}
#: units of the fields of the stage records
RECORD_UNITS: dict[str, str] = {
    "pos": "m",
    "dir": "1",
    "t": "ns",
    "wavelength": "nm",
    "event": "1",
    "pmt": "1",
    "cos_incidence": "1",
    "indirect": "1",
    "dark": "1",
    "n_scatter": "1",
    "n_reflect": "1",
    "x0": "m",
    "x1": "m",
    "beta0": "1",
    "beta1": "1",
    "t0": "ns",
    "n_photons": "1",
    "charge": "p.e.",
    "time": "ns",
}
HITS_UNITS = {"pmt": "1", "charge": "p.e.", "time": "ns", "event": "1", "offsets": "1"}
_RECORD_TYPES = {
    c.__name__: c
    for c in (
        _records.Photons,
        _records.CathodeHits,
        _records.WallHits,
        _records.PhotoElectrons,
        _records.TrackSteps,
        _records.Hits,
    )
}
_WAVEFORM_UNITS = {"samples": "ADC counts", "event": "1", "pmt": "1", "t_start": "ns"}


class RunFileError(ConfigError):
    """A run file that cannot be read: not HDF5, wrong format or version, missing run or dataset."""


@dataclass
class RunData:
    """One run read back from HDF5 (tensors on the requested device).

    truth: {key: (n_events, ...) tensor} (string arrays stay numpy); hits sorted by event with CSR
    ``offsets`` (n_events+1,); photons: a physics.records record or None; waveforms: {'samples' (C,S),
    'event' (C,), 'pmt' (C,), 't_start' (C,) [ns], 'sampling_ns' float} or None; detector: {'name', 'shape',
    'radius' [m], 'height' [m] or None, 'pmt_pos' (P,3) [m], 'pmt_normal' (P,3), 'pmt_radius' (P,) [m]} or
    None; sensors: {'qe_scale' (P,), 'gain' (P,), 'time_offset' (P,) [ns]} (float64) or None (files written
    without them); units: {dataset path inside the run: unit}."""

    name: str
    config: dict[str, Any]
    seed: int
    version: str
    created: str
    n_events: int
    truth: dict[str, Any]
    hits: Hits
    offsets: Tensor
    photons: Any = None
    waveforms: dict[str, Any] | None = None
    detector: dict[str, Any] | None = None
    sensors: dict[str, Tensor] | None = None
    units: dict[str, str] = field(default_factory=dict)

    def event_hits(self, event: int) -> Hits:
        """Hits of one event (a CSR slice)."""
        a, b = int(self.offsets[event]), int(self.offsets[event + 1])
        return self.hits.select(slice(a, b))


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _np(x: Any, field_name: str) -> np.ndarray:
    """Tensor / array / list -> numpy array (CPU, detached)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - report any conversion failure as a config error
        raise ConfigError(
            f"{field_name}: got {type(x).__name__}, expected a tensor or array ({exc})"
        ) from exc


def _write_dataset(
    group: h5py.Group, name: str, data: np.ndarray, unit: str, *, compress: bool = False
) -> h5py.Dataset:
    """Create one dataset with its 'unit' attribute (chunked + gzip-compressed when ``compress``)."""
    kind = "array"
    if data.dtype.kind in "USO":
        data = np.asarray(data, dtype=object).astype(str).astype(object)
        ds = group.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8"))
        kind = "str"
    elif compress:
        chunks = tuple(max(1, min(s, c)) for s, c in zip(data.shape, (64,) + (1 << 16,) * 8, strict=False))
        ds = group.create_dataset(
            name,
            data=data,
            chunks=chunks,
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            maxshape=(None,) + data.shape[1:],
        )
    else:
        ds = group.create_dataset(name, data=data)
    ds.attrs["unit"] = unit
    ds.attrs["kind"] = kind
    return ds


def _read_dataset(group: h5py.Group, name: str, path: Path) -> np.ndarray:
    if name not in group:
        raise RunFileError(
            f"run file {str(path)!r}: dataset {group.name}/{name} is missing "
            f"(present: {sorted(group.keys())})"
        )
    ds = group[name]
    if ds.attrs.get("kind", "array") == "str":
        return np.array(ds.asstr()[()], dtype=str)
    return ds[()]


def _detector_table(det: Any) -> dict[str, Any]:
    """Geometry Detector (attributes) or mapping -> plain dict of the PMT table and shape."""

    def get(key: str, default: Any = None) -> Any:
        if isinstance(det, dict):
            return det.get(key, default)
        return getattr(det, key, default)

    out: dict[str, Any] = {}
    table = det.pmt_table() if hasattr(det, "pmt_table") else {}  # a Detector's float64 table, as built
    for key in ("pmt_pos", "pmt_normal", "pmt_radius"):
        v = table.get(key, get(key))
        if v is None:
            raise ConfigError(
                f"detector.{key}: missing; a detector table needs pmt_pos (P,3), "
                "pmt_normal (P,3), pmt_radius (P,)"
            )
        out[key] = _np(v, f"detector.{key}")
    p = out["pmt_pos"].shape[0]
    if out["pmt_pos"].shape != (p, 3) or out["pmt_normal"].shape != (p, 3) or out["pmt_radius"].shape != (p,):
        raise ConfigError(
            f"detector: pmt_pos {out['pmt_pos'].shape}, pmt_normal {out['pmt_normal'].shape}, "
            f"pmt_radius {out['pmt_radius'].shape}; expected (P,3), (P,3), (P,)"
        )
    shape = get("shape")
    if shape not in ("cylinder", "sphere"):
        raise ConfigError(f"detector.shape: got {shape!r}, allowed: ['cylinder', 'sphere']")
    out["shape"], out["name"] = shape, str(get("name", ""))
    out["radius"] = float(get("radius"))
    h = get("height")
    out["height"] = None if h is None else float(h)
    return out


def _prepare_hits(hits: Hits, n_events: int) -> dict[str, np.ndarray]:
    n = len(hits)
    for f in fields(Hits):
        v = getattr(hits, f.name)
        if v.ndim != 1 or v.shape[0] != n:
            raise ConfigError(f"hits.{f.name}: shape {tuple(v.shape)}, expected ({n},)")
    if n and (int(hits.event.min()) < 0 or int(hits.event.max()) >= n_events):
        raise ConfigError(
            f"hits.event: values in [{int(hits.event.min())}, {int(hits.event.max())}], "
            f"allowed: [0, {n_events - 1}] for n_events={n_events}"
        )
    order = torch.argsort(hits.event.detach(), stable=True)
    out = {f.name: _np(getattr(hits, f.name)[order], f"hits.{f.name}") for f in fields(Hits)}
    out["offsets"] = _np(event_offsets(hits.event.detach().long().cpu(), n_events), "hits.offsets")
    return out


def _atomic_replace(write, path: Path, *, copy_from: Path | None = None) -> None:
    """Run ``write(tmp_path)`` on a temporary file beside ``path`` (a copy of ``copy_from`` if given), fsync
    it and os.replace it onto ``path``; on any exception remove the temporary file and re-raise."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _major(version: str) -> str:
    return str(version).split(".")[0]


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def write_run(
    path: str | os.PathLike,
    *,
    config: dict[str, Any],
    seed: int,
    truth: dict[str, Any],
    hits: Hits,
    n_events: int,
    photons: Any = None,
    waveforms: dict[str, Any] | None = None,
    detector: Any = None,
    sensors: Any = None,
    run_name: str = "run0",
    overwrite: bool = False,
    append: bool = False,
    truth_units: dict[str, str] | None = None,
) -> Path:
    """Write one run atomically; returns the path.

    config: JSON-serialisable mapping (stored as a JSON string; tuples come back as lists); seed: int;
    truth: {key: (n_events, ...) tensor/array} (units from TRUTH_UNITS or ``truth_units``); hits: Hits
    (sorted by event on write, stable); photons: optional record (Photons, CathodeHits, ...); waveforms:
    optional {'samples' (C,S), 'event' (C,), 'pmt' (C,), 't_start' (C,) [ns], 'sampling_ns'}; detector:
    optional Detector or mapping with the PMT table; sensors: optional PMTResponse (its current per-PMT
    values) or mapping {'qe_scale', 'gain', 'time_offset' [ns]} of (P,) arrays.
    Existing file: FileExistsError unless ``overwrite`` (replace the file, or the run when ``append``) or
    ``append`` (add the run to the file; atomic copy-then-replace).
    """
    path = Path(path)
    # ---- validate and convert everything before touching the disk
    n_events = int(n_events)
    if n_events < 0:
        raise ConfigError(f"n_events: got {n_events}, allowed: >= 0")
    if not isinstance(run_name, str) or not run_name or "/" in run_name or run_name.startswith("."):
        raise ConfigError(f"run_name: got {run_name!r}, expected a non-empty name without '/'")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed: got {seed!r} ({type(seed).__name__}), expected an integer")
    try:
        config_json = json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"config: not JSON-serialisable ({exc}); use plain dicts/lists/numbers/strings"
        ) from exc
    units = dict(TRUTH_UNITS, **(truth_units or {}))
    truth_np: dict[str, tuple[np.ndarray, str]] = {}
    for key, val in truth.items():
        if not isinstance(key, str) or "/" in key or not key:
            raise ConfigError(f"truth: key {key!r} is not a valid dataset name")
        arr = _np(val, f"truth[{key!r}]")
        if arr.ndim == 0 or arr.shape[0] != n_events:
            raise ConfigError(
                f"truth[{key!r}]: shape {arr.shape}, expected leading dimension n_events={n_events}"
            )
        if key not in units:
            raise ConfigError(
                f"truth[{key!r}]: unit unknown; pass truth_units={{{key!r}: '<unit>'}} "
                f"(known: {sorted(TRUTH_UNITS)})"
            )
        truth_np[key] = (arr, units[key])
    hits_np = _prepare_hits(hits, n_events)
    phot_np = None
    if photons is not None:
        rtype = type(photons).__name__
        if rtype not in _RECORD_TYPES:
            raise ConfigError(f"photons: got {rtype}, allowed: {sorted(_RECORD_TYPES)}")
        phot_np = (
            rtype,
            {f.name: _np(getattr(photons, f.name), f"photons.{f.name}") for f in fields(photons)},
        )
    wave_np = None
    if waveforms is not None:
        need = {"samples", "event", "pmt", "t_start", "sampling_ns"}
        if not isinstance(waveforms, dict) or set(waveforms) != need:
            got = sorted(waveforms) if isinstance(waveforms, dict) else type(waveforms).__name__
            raise ConfigError(f"waveforms: got keys {got}, expected exactly {sorted(need)}")
        wave_np = {k: _np(waveforms[k], f"waveforms[{k!r}]") for k in ("samples", "event", "pmt", "t_start")}
        c = wave_np["samples"].shape[0] if wave_np["samples"].ndim == 2 else -1
        if c < 0 or any(wave_np[k].shape != (c,) for k in ("event", "pmt", "t_start")):
            raise ConfigError(
                f"waveforms: samples {wave_np['samples'].shape}, event/pmt/t_start "
                f"{[wave_np[k].shape for k in ('event', 'pmt', 't_start')]}; "
                "expected (C,S) and (C,)"
            )
        sampling = float(waveforms["sampling_ns"])
        if not sampling > 0:
            raise ConfigError(f"waveforms['sampling_ns']: got {sampling}, allowed: > 0")
        wave_np["sampling_ns"] = sampling
    det_np = _detector_table(detector) if detector is not None else None
    sens_np = None
    if sensors is not None:  # a PMTResponse's current values or a mapping, checked as a response takes them
        values = sensors.per_pmt_values() if hasattr(sensors, "per_pmt_values") else sensors
        sens_np = check_per_pmt_values(values, None if det_np is None else det_np["pmt_pos"].shape[0])

    exists = path.exists()
    if exists and not (overwrite or append):
        raise FileExistsError(
            f"run file {str(path)!r} already exists; pass overwrite=True to replace it "
            "or append=True to add a run"
        )
    copy_from = None
    if append and exists:
        _check_file(path)
        with h5py.File(path, "r") as f:
            if run_name in f and not overwrite:
                raise FileExistsError(
                    f"run file {str(path)!r} already holds run {run_name!r}; "
                    "pass overwrite=True to replace that run"
                )
        copy_from = path

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "a" if copy_from is not None else "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            if run_name in f:
                del f[run_name]
            g = f.create_group(run_name)
            g.attrs["config"] = config_json
            g.attrs["seed"] = int(seed)
            g.attrs["version"] = physics.__version__
            g.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
            g.attrs["n_events"] = n_events
            g.attrs["format_version"] = FORMAT_VERSION
            gh = g.create_group("hits")
            for k in ("pmt", "charge", "time", "event", "offsets"):
                _write_dataset(gh, k, hits_np[k], HITS_UNITS[k])
            gt = g.create_group("truth")
            for k, (arr, unit) in truth_np.items():
                _write_dataset(gt, k, arr, unit)
            if phot_np is not None:
                gp = g.create_group("photons")
                gp.attrs["record_type"] = phot_np[0]
                for k, arr in phot_np[1].items():
                    _write_dataset(gp, k, arr, RECORD_UNITS.get(k, "1"))
            if wave_np is not None:
                gw = g.create_group("waveforms")
                gw.attrs["sampling_ns"] = wave_np["sampling_ns"]
                gw.attrs["sampling_unit"] = "ns"
                for k, unit in _WAVEFORM_UNITS.items():
                    _write_dataset(gw, k, wave_np[k], unit, compress=(k == "samples"))
            if det_np is not None:
                gd = g.create_group("detector")
                gd.attrs["name"], gd.attrs["shape"] = det_np["name"], det_np["shape"]
                gd.attrs["radius"] = det_np["radius"]
                gd.attrs["height"] = np.nan if det_np["height"] is None else det_np["height"]
                gd.attrs["length_unit"] = "m"
                for k, unit in (("pmt_pos", "m"), ("pmt_normal", "1"), ("pmt_radius", "m")):
                    _write_dataset(gd, k, det_np[k], unit)
            if sens_np is not None:
                gs = g.create_group("sensors")
                for k, arr in sens_np.items():
                    _write_dataset(gs, k, arr, PER_PMT_UNITS[k])

    _atomic_replace(write, path, copy_from=copy_from)
    return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"run file {str(path)!r} does not exist")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise RunFileError(f"run file {str(path)!r} is not an HDF5 file")
    with h5py.File(path, "r") as f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT_NAME:
            raise RunFileError(
                f"run file {str(path)!r}: attribute format={fmt!r}, expected {FORMAT_NAME!r} "
                "(not a photonfit run file)"
            )
        fv = str(f.attrs.get("format_version", ""))
        if _major(fv) != _major(FORMAT_VERSION):
            raise RunFileError(
                f"run file {str(path)!r}: format_version {fv!r}, this reader supports "
                f"{_major(FORMAT_VERSION)}.x"
            )


def list_runs(path: str | os.PathLike) -> list[str]:
    """Names of the runs in a run file (sorted)."""
    path = Path(path)
    _check_file(path)
    with h5py.File(path, "r") as f:
        return sorted(k for k, v in f.items() if isinstance(v, h5py.Group))


def read_run(path: str | os.PathLike, run: str | None = None, device: torch.device | str = "cpu") -> RunData:
    """Read one run (the only one when ``run`` is None) into torch tensors on ``device``.

    Errors: FileNotFoundError (missing file), RunFileError (not HDF5 / not a photonfit file / major version
    differs from this package's / run or dataset missing / inconsistent offsets)."""
    path = Path(path)
    _check_file(path)
    runs = list_runs(path)

    def t(a: np.ndarray) -> Any:
        return a if a.dtype.kind in "USO" else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    with h5py.File(path, "r") as f:
        if run is None:
            if len(runs) != 1:
                raise RunFileError(f"run file {str(path)!r} holds runs {runs}; pass run=<name>")
            run = runs[0]
        if run not in runs:
            raise RunFileError(f"run file {str(path)!r}: run {run!r} not found (present: {runs})")
        g = f[run]
        for key in ("config", "seed", "version", "created", "n_events"):
            if key not in g.attrs:
                raise RunFileError(f"run file {str(path)!r}: run {run!r} lacks attribute {key!r}")
        version = str(g.attrs["version"])
        if _major(version) != _major(physics.__version__):
            raise RunFileError(
                f"run file {str(path)!r}: written by photonfit {version}, this is "
                f"{physics.__version__} (major version differs)"
            )
        units: dict[str, str] = {}
        g.visititems(
            lambda name, obj: (
                units.__setitem__(name, str(obj.attrs.get("unit"))) if isinstance(obj, h5py.Dataset) else None
            )
        )
        n_events = int(g.attrs["n_events"])
        for grp in ("hits", "truth"):
            if grp not in g:
                raise RunFileError(f"run file {str(path)!r}: group {run}/{grp} is missing")
        gh = g["hits"]
        h = {k: _read_dataset(gh, k, path) for k in ("pmt", "charge", "time", "event", "offsets")}
        expect_off = event_offsets(torch.from_numpy(h["event"]).long(), n_events).numpy()
        if not np.array_equal(h["offsets"], expect_off):
            raise RunFileError(f"run file {str(path)!r}: {run}/hits/offsets inconsistent with hits/event")
        hits = Hits(pmt=t(h["pmt"]), charge=t(h["charge"]), time=t(h["time"]), event=t(h["event"]))
        truth = {k: t(_read_dataset(g["truth"], k, path)) for k in g["truth"]}
        photons = None
        if "photons" in g:
            gp = g["photons"]
            cls = _RECORD_TYPES.get(str(gp.attrs.get("record_type")))
            if cls is None:
                raise RunFileError(
                    f"run file {str(path)!r}: unknown photons record_type {gp.attrs.get('record_type')!r}"
                )
            photons = cls(**{fl.name: t(_read_dataset(gp, fl.name, path)) for fl in fields(cls)})
        waveforms = None
        if "waveforms" in g:
            gw = g["waveforms"]
            waveforms = {k: t(_read_dataset(gw, k, path)) for k in _WAVEFORM_UNITS}
            waveforms["sampling_ns"] = float(gw.attrs["sampling_ns"])
        detector = None
        if "detector" in g:
            gd = g["detector"]
            detector = {k: t(_read_dataset(gd, k, path)) for k in ("pmt_pos", "pmt_normal", "pmt_radius")}
            height = float(gd.attrs["height"])
            detector.update(
                name=str(gd.attrs["name"]),
                shape=str(gd.attrs["shape"]),
                radius=float(gd.attrs["radius"]),
                height=None if np.isnan(height) else height,
            )
        sensors = None
        if "sensors" in g:
            gs = g["sensors"]
            sensors = {k: t(_read_dataset(gs, k, path)) for k in PER_PMT_UNITS if k in gs}
        return RunData(
            name=run,
            config=json.loads(g.attrs["config"]),
            seed=int(g.attrs["seed"]),
            version=version,
            created=str(g.attrs["created"]),
            n_events=n_events,
            truth=truth,
            hits=hits,
            offsets=t(h["offsets"]),
            photons=photons,
            waveforms=waveforms,
            detector=detector,
            sensors=sensors,
            units=units,
        )
