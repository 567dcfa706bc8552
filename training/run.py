"""YAML-driven CBAE training run (the body of ``photonfit train --config configs/train/cbae.yaml``).

Config blocks: ``seed``, ``electronics`` (preset name or YAML path), ``data`` (see training/data.py),
``model`` (enc_hidden, dec_hidden, n_free), ``loss`` (training/module.py), ``optim`` (lr, max_epochs,
patience, max_minutes, weight_decay, min_lr_factor, grad_clip, ema_decay, var_refit_epochs), ``logger``
(kind: wandb|csv, project), ``output`` (dir, export).
The run directory gets the resolved config (``config.yaml``, atomic), logs, Lightning checkpoints and the
exported model (``model.pt`` + ``model.json`` metadata); ``output.export`` copies them to e.g. checkpoints/.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from physics import __version__
from physics.config import ConfigError, check_choice, check_keys, check_number, load_yaml
from surrogate.cbae import save_cbae
from training.data import WaveformDataModule
from training.module import CBAEModule

TOP_REQ = ["seed", "electronics", "data", "model", "loss", "optim"]
TOP_OPT = ["logger", "output", "name", "description", "threads", "accelerator"]


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested config copy."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: got {item!r}, expected KEY.PATH=VALUE")
        key, val = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(val)
    return cfg


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    cfg = apply_overrides(load_yaml(path), overrides)
    check_keys(cfg, required=TOP_REQ, optional=TOP_OPT, where=f"train config {str(path)!r}")
    check_number(cfg["seed"], "train.seed", integer=True)
    lg = cfg.setdefault("logger", {"kind": "wandb"})
    check_keys(lg, required=["kind"], optional=["project", "name"], where="train.logger")
    check_choice(lg["kind"], "train.logger.kind", ["wandb", "csv"])
    out = cfg.setdefault("output", {})
    check_keys(out, required=[], optional=["dir", "export"], where="train.output")
    out.setdefault("dir", f"runs/{Path(path).stem}")
    return cfg


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class EpochPrinter(L.Callback):
    """Print one line of validation metrics per epoch (stderr), with the elapsed wall time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        keys = ("val/loss", "val/charge_rms", "val/time_rms", "val/denoise_rms")
        vals = " ".join(f"{k.split('/')[1]}={float(m[k]):.4g}" for k in keys if k in m)
        print(
            f"[train] epoch {trainer.current_epoch} {vals} t={time.perf_counter() - self.t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )


def make_logger(cfg: Mapping[str, Any], run_dir: Path):
    """wandb, offline (WANDB_MODE=offline unless the user set it); CSVLogger if disabled/unavailable."""
    lg = cfg.get("logger", {})
    if lg.get("kind", "wandb") == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger

            return WandbLogger(
                project=lg.get("project", "photonfit"),
                name=lg.get("name"),
                save_dir=str(run_dir),
                offline=os.environ["WANDB_MODE"] in ("offline", "dryrun"),
            )
        except Exception as exc:  # noqa: BLE001 - any wandb failure: fall back, say so
            print(f"[train] wandb unavailable ({exc}); using CSVLogger", file=sys.stderr)
    return CSVLogger(save_dir=str(run_dir), name="csv")


def train(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    fast_dev_run: bool | int = False,
    output_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run one training from a YAML config; returns a summary dict (run dir, model path, metrics, seconds)."""
    cfg = load_train_config(config, overrides)
    if output_dir is not None:
        cfg["output"]["dir"] = str(output_dir)
    run_dir = Path(cfg["output"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)
    threads = check_number(cfg.get("threads", 1), "train.threads", minimum=1, integer=True)
    torch.set_num_threads(threads)

    dm = WaveformDataModule(cfg["data"], electronics=str(cfg["electronics"]))
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup()
    t_data = time.perf_counter() - t0
    norm = dm.normalisation()
    module = CBAEModule(cfg["model"], norm, cfg["loss"], cfg["optim"])
    opt = cfg["optim"]
    patience = check_number(opt.get("patience", 6), "train.optim.patience", minimum=1, integer=True)
    max_min = check_number(
        opt.get("max_minutes", 14.0), "train.optim.max_minutes", minimum=0.0, strict_min=True
    )
    ckpt = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        filename="best-{epoch}",
    )
    callbacks = [ckpt, EarlyStopping(monitor="val/loss", mode="min", patience=patience), EpochPrinter()]
    logger = CSVLogger(save_dir=str(run_dir), name="csv") if fast_dev_run else make_logger(cfg, run_dir)
    trainer = L.Trainer(
        max_epochs=int(opt["max_epochs"]),
        max_time={"minutes": max_min},
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        fast_dev_run=fast_dev_run,
        enable_progress_bar=sys.stderr.isatty() if progress is None else progress,
        enable_model_summary=False,
        gradient_clip_val=check_number(opt.get("grad_clip", 0.0), "train.optim.grad_clip", minimum=0.0),
        log_every_n_steps=50,
        accelerator=check_choice(cfg.get("accelerator", "cpu"), "train.accelerator", ["cpu", "gpu", "auto"]),
        devices=1,
    )
    t1 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    t_train = time.perf_counter() - t1
    best = ckpt.best_model_path
    if best and not fast_dev_run:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    t_refit = 0.0
    if module.var_refit_epochs and not fast_dev_run:
        t2 = time.perf_counter()
        module.refit_variance(dm.train_dataloader(), module.var_refit_epochs)
        t_refit = time.perf_counter() - t2
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if not fast_dev_run and best:
        val = trainer.validate(module, datamodule=dm, verbose=False)
        metrics.update({f"best_{k}": float(v) for k, v in (val[0] if val else {}).items()})
    tr_file, va_file = dm.files()
    meta = {
        "config": cfg,
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "data": {
            "train_file": str(tr_file),
            "val_file": str(va_file),
            "electronics": str(cfg["electronics"]),
            "train_generator": _gen_attrs(tr_file),
            "label_fraction": dm.label_fraction,
            "seed_train": dm.seed,
            "seed_val": dm.seed + 1,
        },
        "metrics": metrics,
        "epochs": int(trainer.current_epoch),
        "train_seconds": t_train,
        "var_refit_seconds": t_refit,
        "data_seconds": t_data,
        "threads": torch.get_num_threads(),
        "best_checkpoint": best,
        "parameters": int(sum(p.numel() for p in module.final_model.parameters())),
    }
    model_path = save_cbae(module.final_model.cpu(), run_dir / "model.pt", meta)
    _atomic_write(run_dir / "model.json", json.dumps(meta, indent=2, default=str))
    export = cfg["output"].get("export")
    if export and not fast_dev_run:
        dst = Path(export)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path, dst.with_name(f".{dst.name}.tmp"))
        os.replace(dst.with_name(f".{dst.name}.tmp"), dst)
        _atomic_write(dst.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
    return {
        "run_dir": str(run_dir),
        "model": str(model_path),
        "metrics": metrics,
        "train_seconds": t_train,
        "epochs": int(trainer.current_epoch),
    }


def _gen_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        g = f["waveforms"]
        return {
            "generator": json.loads(g.attrs["generator"]),
            "seed": int(g.attrs["seed"]),
            "version": str(g.attrs["version"]),
        }
