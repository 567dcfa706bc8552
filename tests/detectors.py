"""Small test detectors shared by the test modules (not a test file)."""

from __future__ import annotations

import torch

from physics.geometry import Detector, cylinder_grid

F64 = torch.float64


def small_cylinder(radius: float, height: float, pmt_radius: float, spacing: float) -> Detector:
    """Cylinder [m] with a barrel grid + caps of PMTs (radius ``pmt_radius``, pitch ``spacing``), float64."""
    pos, nrm = cylinder_grid(radius, height, pmt_radius, spacing)
    return Detector(
        "test", "cylinder", radius, height, pos, nrm, torch.full((len(pos),), pmt_radius, dtype=F64)
    ).to(dtype=F64)
