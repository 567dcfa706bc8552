"""Shared helpers for benchmark scripts: atomic JSON output and machine description."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where the figures were measured."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def atomic_write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (unique temporary file in the same folder, then
    rename), creating the folder; an interrupted run never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically, with the machine description, and print it."""
    payload = {"machine": machine(), **payload}
    path = atomic_write_json(RESULTS / f"{name}.json", payload)
    print(json.dumps(payload, indent=2))
    return path
