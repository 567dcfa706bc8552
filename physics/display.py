"""Run summaries and event displays (matplotlib Agg canvas, no pyplot state; PNG written atomically).

Cylinder: the standard water-Cherenkov "unrolled" view — the barrel as the rectangle (R*phi, z) [m] with
phi = atan2(y, x) in [-pi, pi], the top cap drawn as a disk (x, y) above it and the bottom cap as a disk
(x, -y) below it. Sphere: a Mollweide projection of (longitude phi, latitude asin(z/r)).
Left panel: charge [p.e.] on a log colour scale; right panel: first-hit time [ns].
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from physics.config import ConfigError


def _get(det: Any, key: str, default: Any = None) -> Any:
    if isinstance(det, dict):
        return det.get(key, default)
    return getattr(det, key, default)


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def summary(run: Any) -> str:
    """Text summary of a RunData: events, hits/event, charge/event mean +- std, time range, config keys."""
    n_ev = int(run.n_events)
    hits = run.hits
    ev = _arr(hits.event).astype(np.int64)
    charge = _arr(hits.charge).astype(np.float64)
    time = _arr(hits.time).astype(np.float64)
    nh = np.bincount(ev, minlength=n_ev) if n_ev else np.zeros(0)
    q_ev = np.bincount(ev, weights=charge, minlength=n_ev) if n_ev else np.zeros(0)

    def ms(a: np.ndarray) -> str:
        return f"{a.mean():.3f} +- {a.std():.3f}" if a.size else "n/a"

    lines = [
        f"run {run.name!r}: photonfit {run.version}, seed {run.seed}, created {run.created}",
        f"  events: {n_ev}, hits: {len(hits)}",
        f"  hits/event: {ms(nh)}",
        f"  charge/event [p.e.]: {ms(q_ev)}",
        "  hit time [ns]: " + (f"{time.min():.3f} .. {time.max():.3f}" if time.size else "n/a"),
        f"  truth: {sorted(run.truth)}",
        f"  config keys: {sorted(run.config)}",
    ]
    if run.photons is not None:
        lines.append(f"  photons: {type(run.photons).__name__} x {len(run.photons)}")
    if run.waveforms is not None:
        s = run.waveforms["samples"]
        lines.append(f"  waveforms: {tuple(s.shape)} samples at {run.waveforms['sampling_ns']} ns")
    if run.detector is not None:
        d = run.detector
        lines.append(f"  detector: {d.get('name')!r} {d.get('shape')} with {len(d['pmt_radius'])} PMTs")
    return "\n".join(lines)


def unrolled_coordinates(
    pos: np.ndarray, normal: np.ndarray | None, radius: float, height: float
) -> np.ndarray:
    """(P,3) PMT positions [m] of a cylinder -> (P,2) display coordinates [m] of the unrolled view.

    Barrel (|n_z| < 0.5, or |z| < H/2 - 1e-6 without normals): (R*phi, z). Top cap (z > 0): (x, H/2 + R + y);
    bottom cap: (x, -H/2 - R - y); caps are drawn as disks of radius R touching the barrel rectangle."""
    x, y, z = pos[:, 0], pos[:, 1], pos[:, 2]
    if normal is not None:
        cap = np.abs(normal[:, 2]) > 0.5
    else:
        cap = np.abs(z) >= height / 2 - 1e-6
    top = cap & (z > 0)
    bot = cap & (z <= 0)
    out = np.empty((pos.shape[0], 2))
    out[:, 0] = radius * np.arctan2(y, x)
    out[:, 1] = z
    out[top, 0], out[top, 1] = x[top], height / 2 + radius + y[top]
    out[bot, 0], out[bot, 1] = x[bot], -height / 2 - radius - y[bot]
    return out


def event_display(run: Any, event: int, path: str | os.PathLike, detector: Any = None) -> Path:
    """Write a two-panel PNG (log charge, first-hit time) of one event; returns the path.

    detector: a geometry Detector or mapping with shape, radius [m], height [m], pmt_pos (P,3) and
    optionally pmt_normal (P,3); defaults to ``run.detector``. The PNG is written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    det = detector if detector is not None else run.detector
    if det is None:
        raise ConfigError("detector: none given and the run stores no detector table")
    event = int(event)
    if not 0 <= event < int(run.n_events):
        raise ConfigError(f"event: got {event}, allowed: [0, {int(run.n_events) - 1}]")
    shape = _get(det, "shape")
    if shape not in ("cylinder", "sphere"):
        raise ConfigError(f"detector.shape: got {shape!r}, allowed: ['cylinder', 'sphere']")
    pos = _arr(_get(det, "pmt_pos")).astype(np.float64)
    nrm = _get(det, "pmt_normal")
    nrm = None if nrm is None else _arr(nrm).astype(np.float64)
    radius = float(_get(det, "radius"))
    h = run.event_hits(event)
    pmt = _arr(h.pmt).astype(np.int64)
    q = _arr(h.charge).astype(np.float64)
    t = _arr(h.time).astype(np.float64)
    if pmt.size and pmt.max() >= pos.shape[0]:
        raise ConfigError(f"detector: has {pos.shape[0]} PMTs but the event hits PMT {pmt.max()}")

    fig = Figure(figsize=(13, 6.5) if shape == "cylinder" else (14, 4.8))
    FigureCanvasAgg(fig)  # Agg canvas attached to this figure only (no global pyplot state)
    title = f"run {run.name!r} event {event}: {pmt.size} hits, {q.sum():.1f} p.e."
    fig.suptitle(title)
    qpos = np.clip(q, 1e-3, None)
    qnorm = LogNorm(vmin=max(qpos.min(), 1e-2), vmax=max(qpos.max(), 1.0)) if q.size else None
    if shape == "cylinder":
        height = float(_get(det, "height"))
        xy = unrolled_coordinates(pos, nrm, radius, height)
        ms = max(1.0, 3000.0 / max(pos.shape[0], 1))
        for k, (vals, label, cmap, norm) in enumerate(
            ((qpos, "charge [p.e.]", "viridis", qnorm), (t, "first-hit time [ns]", "plasma", None))
        ):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.add_patch(
                Rectangle((-np.pi * radius, -height / 2), 2 * np.pi * radius, height, fill=False, lw=0.8)
            )
            ax.add_patch(Circle((0, height / 2 + radius), radius, fill=False, lw=0.8))
            ax.add_patch(Circle((0, -height / 2 - radius), radius, fill=False, lw=0.8))
            ax.scatter(xy[:, 0], xy[:, 1], s=ms * 0.3, c="0.85", linewidths=0)
            if pmt.size:
                sc = ax.scatter(xy[pmt, 0], xy[pmt, 1], s=ms * 4, c=vals, cmap=cmap, norm=norm, linewidths=0)
                fig.colorbar(sc, ax=ax, label=label, shrink=0.8)
            ax.set_aspect("equal")
            ax.set_xlim(-np.pi * radius * 1.02, np.pi * radius * 1.02)
            ax.set_ylim(-height / 2 - 2.05 * radius, height / 2 + 2.05 * radius)
            ax.set_xlabel("R phi [m]")
            ax.set_ylabel("z [m] (caps: y [m])")
            ax.set_title(label)
    else:
        r = np.linalg.norm(pos, axis=1).clip(1e-12)
        lon = np.arctan2(pos[:, 1], pos[:, 0])
        lat = np.arcsin(np.clip(pos[:, 2] / r, -1, 1))
        ms = max(1.0, 6000.0 / max(pos.shape[0], 1))
        for k, (vals, label, cmap, norm) in enumerate(
            ((qpos, "charge [p.e.]", "viridis", qnorm), (t, "first-hit time [ns]", "plasma", None))
        ):
            ax = fig.add_subplot(1, 2, k + 1, projection="mollweide")
            ax.scatter(lon, lat, s=ms * 0.3, c="0.85", linewidths=0)
            if pmt.size:
                sc = ax.scatter(lon[pmt], lat[pmt], s=ms * 4, c=vals, cmap=cmap, norm=norm, linewidths=0)
                fig.colorbar(sc, ax=ax, label=label, orientation="horizontal", shrink=0.7, pad=0.08)
            ax.grid(True, lw=0.3)
            ax.tick_params(labelsize=6)
            ax.set_title(label + "  (Mollweide: phi, asin(z/r))", fontsize=9, pad=14)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
