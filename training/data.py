"""LightningDataModule for labelled waveform HDF5 sets (lazy h5py reads, one file handle per worker).

Files are made by :func:`physics.waveforms.make_waveform_file` when absent (cached by a hash of the
generator arguments) or given explicitly. A seeded ``label_fraction`` mask marks which training items
carry labels (semi-supervised CBAE training, arXiv:2203.04604).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from physics.config import ConfigError, check_keys, check_number
from physics.electronics import Electronics
from physics.waveforms import WaveformDataset, collate_batch, make_waveform_file

DATA_KEYS_REQ = ["n_train", "n_val", "seed", "noise", "charge_range", "time_range", "batch_size"]
DATA_KEYS_OPT = [
    "dir",
    "pileup_mean",
    "label_fraction",
    "num_workers",
    "train_file",
    "val_file",
    "block",
    "charge_prior",
    "noise_prior",
]


class BlockShuffleBatchSampler(Sampler[list[int]]):
    """Batches drawn within shuffled contiguous blocks (block order and in-block order re-shuffled each
    epoch with a seeded generator): each batch is one dense HDF5 read instead of a scattered selection."""

    def __init__(self, n: int, batch_size: int, block: int = 4096, shuffle: bool = True, seed: int = 0):
        self.n, self.bs, self.block, self.shuffle, self.seed, self.epoch = (
            n,
            batch_size,
            max(block, batch_size),
            shuffle,
            seed,
            0,
        )

    def __len__(self) -> int:
        return sum(-(-min(self.block, self.n - s) // self.bs) for s in range(0, self.n, self.block))

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        starts = list(range(0, self.n, self.block))
        batches: list[list[int]] = []
        for s in starts:
            m = min(self.block, self.n - s)
            perm = (torch.randperm(m, generator=g) if self.shuffle else torch.arange(m)) + s
            batches += [perm[i : i + self.bs].tolist() for i in range(0, m, self.bs)]
        order = torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches))
        return iter([batches[i] for i in order])


def _file_for(cfg: Mapping[str, Any], electronics: str, split: str, n: int, seed: int) -> Path:
    gen = {
        "electronics": electronics,
        "n": n,
        "seed": seed,
        "noise": cfg["noise"],
        "charge_range": cfg["charge_range"],
        "time_range": cfg["time_range"],
        "pileup_mean": cfg.get("pileup_mean", 0.0),
    }
    for k in ("charge_prior", "noise_prior"):  # hashed only when set, so earlier cached sets keep their names
        if cfg.get(k, "uniform") != "uniform":
            gen[k] = cfg[k]
    h = hashlib.sha1(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:10]
    name = Path(str(electronics)).stem
    return Path(cfg.get("dir", "data/cbae")) / f"{name}_{split}_n{n}_s{seed}_{h}.h5"


class WaveformDataModule(L.LightningDataModule):
    """Train/val waveform sets from a ``data`` config block (see configs/train/cbae.yaml)."""

    def __init__(self, data: Mapping[str, Any], electronics: str = "default"):
        super().__init__()
        check_keys(data, required=DATA_KEYS_REQ, optional=DATA_KEYS_OPT, where="train.data")
        self.cfg = dict(data)
        self.electronics = electronics
        self.batch_size = check_number(data["batch_size"], "train.data.batch_size", minimum=1, integer=True)
        self.num_workers = check_number(
            data.get("num_workers", 0), "train.data.num_workers", minimum=0, integer=True
        )
        self.label_fraction = check_number(
            data.get("label_fraction", 1.0), "train.data.label_fraction", minimum=0.0, maximum=1.0
        )
        self.block = check_number(data.get("block", 4096), "train.data.block", minimum=1, integer=True)
        self.seed = check_number(data["seed"], "train.data.seed", integer=True)
        self.train_ds: WaveformDataset | None = None
        self.val_ds: WaveformDataset | None = None

    def files(self) -> tuple[Path, Path]:
        c = self.cfg
        tr = (
            Path(c["train_file"])
            if c.get("train_file")
            else _file_for(c, self.electronics, "train", int(c["n_train"]), self.seed)
        )
        va = (
            Path(c["val_file"])
            if c.get("val_file")
            else _file_for(c, self.electronics, "val", int(c["n_val"]), self.seed + 1)
        )
        return tr, va

    def prepare_data(self) -> None:
        c = self.cfg
        el = Electronics.load(self.electronics)
        kw = {
            "charge_range": tuple(c["charge_range"]),
            "time_range": tuple(c["time_range"]),
            "noise": c["noise"],
            "pileup_mean": float(c.get("pileup_mean", 0.0)),
            "charge_prior": c.get("charge_prior", "uniform"),
            "noise_prior": c.get("noise_prior", "uniform"),
        }
        for path, n, seed, given in zip(
            self.files(),
            (c["n_train"], c["n_val"]),
            (self.seed, self.seed + 1),
            (c.get("train_file"), c.get("val_file")),
            strict=True,
        ):
            if given and not path.is_file():
                raise ConfigError(f"train.data file: {str(path)!r} does not exist")
            if not path.is_file():
                make_waveform_file(path, el, n=int(n), seed=int(seed), **kw)

    def setup(self, stage: str | None = None) -> None:
        tr, va = self.files()
        n = len(WaveformDataset(tr))
        g = torch.Generator().manual_seed(self.seed + 7919)
        mask = (torch.rand(n, generator=g) < self.label_fraction).numpy()
        if self.label_fraction > 0 and not mask.any():
            mask[0] = True
        self.train_ds = WaveformDataset(tr, label_mask=mask)
        self.val_ds = WaveformDataset(va)
        if self.train_ds.n_samples != self.val_ds.n_samples:
            raise ConfigError(
                f"train.data: train/val waveform lengths differ ({self.train_ds.n_samples} vs "
                f"{self.val_ds.n_samples})"
            )

    def normalisation(self, max_items: int = 20000) -> dict[str, Any]:
        """Input/output scale [ADC] and labelled-parameter mean/std (physical units) from the training set."""
        if self.train_ds is None:
            self.setup()
        ds = self.train_ds
        b = ds.__getitems__(list(range(min(max_items, len(ds)))))
        el = ds.electronics
        lab = b["labelled"]
        y = b["params"][lab] if lab.any() else b["params"]
        return {
            "wf_offset": float(el["baseline"]),
            "wf_scale": float((b["adc"] - el["baseline"]).std()),
            "param_mean": y.mean(0).tolist(),
            "param_std": y.std(0).clamp_min(1e-6).tolist(),
            "sample_times": [-el["pre_trigger"] + k * el["sampling_period"] for k in range(ds.n_samples)],
            "n_samples": ds.n_samples,
            "electronics": el,
        }

    def _loader(self, ds: WaveformDataset, shuffle: bool) -> DataLoader:
        sampler = BlockShuffleBatchSampler(len(ds), self.batch_size, self.block, shuffle, self.seed)
        return DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ds, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, False)


def label_mask_fraction(ds: WaveformDataset) -> float:
    return float(np.mean(ds.label_mask))
