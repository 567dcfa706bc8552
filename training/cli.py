"""CLI entry points wired into ``photonfit`` by fitting/cli.py.

``add_waveforms_parser(sub)``: ``photonfit waveforms {simulate,analyze,generate}``;
``add_train_parser(sub)``: ``photonfit train --config configs/train/cbae.yaml [--set k=v ...]``.
Each sub-parser sets ``func`` (handler(args) -> int exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from physics.config import ConfigError
from physics.electronics import Electronics
from physics.waveforms import PRIORS, make_waveform_file, read_waveforms, write_waveforms

SHAPE_PRESETS = {"lognormal": "default", "biexp": "biexp", "ringing": "ringing"}


def _electronics_name(args: argparse.Namespace) -> str:
    if args.electronics:
        return args.electronics
    if args.shape not in SHAPE_PRESETS:
        raise ConfigError(f"--shape: got {args.shape!r}, allowed: {list(SHAPE_PRESETS)}")
    return SHAPE_PRESETS[args.shape]


def cmd_simulate(args: argparse.Namespace) -> int:
    el = Electronics.load(_electronics_name(args)).to(args.device)
    path = make_waveform_file(
        args.output,
        el,
        n=args.n,
        seed=args.seed,
        charge_range=tuple(args.charge),
        time_range=tuple(args.time),
        noise=args.noise,
        pileup_mean=args.pileup,
        charge_prior=args.charge_prior,
        noise_prior=args.noise_prior,
    )
    print(f"wrote {args.n} waveforms ({el.shape}, {el.n_samples} samples, noise {args.noise}) to {path}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from surrogate.cbae import load_cbae

    data, attrs = read_waveforms(args.input)
    model = load_cbae(args.model, n_samples=int(data["adc"].shape[1])).to(args.device)
    if model.electronics and attrs.get("electronics", {}).get("shape") not in (
        None,
        model.electronics.get("shape"),
    ):
        print(
            f"warning: data shape {attrs['electronics'].get('shape')!r} differs from the model's "
            f"{model.electronics.get('shape')!r}",
            file=sys.stderr,
        )
    adc = data["adc"]
    out: dict[str, list[torch.Tensor]] = {
        "charge": [],
        "time": [],
        "charge_sigma": [],
        "time_sigma": [],
        "denoised": [],
    }
    with torch.inference_mode():
        for i in range(0, adc.shape[0], args.batch):
            x = adc[i : i + args.batch].to(args.device).float()
            p, s = model.estimate(x)
            if args.refine:
                with torch.inference_mode(False):  # chunks of 8192: bounded forward-mode memory
                    fits = [
                        model.refine(x[j : j + 8192].clone(), p[j : j + 8192].clone(), args.refine_iter)
                        for j in range(0, x.shape[0], 8192)
                    ]
                p, s = torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])
            out["charge"].append(p[:, 0])
            out["time"].append(p[:, 1])
            out["charge_sigma"].append(s[:, 0])
            out["time_sigma"].append(s[:, 1])
            out["denoised"].append(model.denoise(x))
    res = {k: torch.cat(v).cpu() for k, v in out.items()}
    extra = {f"true_{k}": data[k] for k in ("charge", "time") if k in data}
    el = Electronics(attrs["electronics"])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_waveforms(
        args.output,
        res,
        el,
        {"model": str(args.model), "input": str(args.input), "refine": bool(args.refine)},
        None,
        extra,
        group="analysis",
    )
    msg = f"analysed {adc.shape[0]} waveforms -> {args.output}"
    if extra:
        dq = (res["charge"] - data["charge"]).float()
        dt = (res["time"] - data["time"]).float()
        msg += (
            f"; charge bias {dq.mean():.4f} p.e. rms {dq.pow(2).mean().sqrt():.4f} p.e., "
            f"time bias {dt.mean():.4f} ns rms {dt.pow(2).mean().sqrt():.4f} ns"
        )
    print(msg)
    return 0


def _floats(v: list[float], n: int, field: str) -> torch.Tensor:
    t = torch.tensor(v, dtype=torch.float32)
    if len(v) == 1:
        return t.expand(n).clone()
    if len(v) != n:
        raise ConfigError(f"{field}: got {len(v)} values, expected 1 or {n}")
    return t


def cmd_generate(args: argparse.Namespace) -> int:
    from physics.waveforms import noise_range
    from surrogate.cbae import load_cbae

    model = load_cbae(args.model).to(args.device)
    n = max(len(args.charge), len(args.time)) * args.repeat
    q = _floats(args.charge, n // args.repeat, "--charge").repeat(args.repeat)
    t = _floats(args.time, n // args.repeat, "--time").repeat(args.repeat)
    if (q < 0).any():
        raise ConfigError(f"--charge: got {args.charge}, allowed: >= 0 p.e.")
    with torch.inference_mode():
        wf = model.expect(torch.stack([q, t], 1).to(args.device)).double().cpu()
    el = Electronics(model.electronics if not args.electronics else Electronics.load(args.electronics).config)
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = noise_range(args.noise)
    scale = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    adc = el.digitise(wf + el.noise(n, g, scale, torch.float64))
    data = {
        "adc": adc,
        "clean": wf.float(),
        "charge": q,
        "time": t,
        "noise_scale": scale.float(),
        "sample_times": model.sample_times.cpu(),
    }
    write_waveforms(
        args.output,
        data,
        el,
        {"model": str(args.model), "noise": args.noise, "source": "cbae decoder"},
        args.seed,
    )
    print(f"generated {n} waveforms from the decoder of {args.model} -> {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.run import train

    res = train(args.config, args.set or [], fast_dev_run=args.fast_dev_run, output_dir=args.output)
    print(json.dumps({k: v for k, v in res.items() if k != "metrics"}, default=str))
    m = res["metrics"]
    keys = [k for k in ("best_val/charge_rms", "best_val/time_rms", "best_val/denoise_rms") if k in m]
    if keys:
        print(" ".join(f"{k}={m[k]:.4g}" for k in keys))
    return 0


def add_waveforms_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``photonfit waveforms {simulate,analyze,generate}``."""
    p = subparsers.add_parser("waveforms", help="labelled waveform sets; CBAE analysis and generation")
    sub = p.add_subparsers(dest="waveforms_cmd", required=True)

    s = sub.add_parser("simulate", help="simulate labelled digitised waveforms to HDF5")
    s.add_argument(
        "--shape", default="lognormal", help=f"pulse shape: {list(SHAPE_PRESETS)} (selects a preset)"
    )
    s.add_argument("--electronics", default=None, help="electronics preset name or YAML (overrides --shape)")
    s.add_argument("--noise", default="medium", help="low|medium|high|none, a scale factor, or lo:hi")
    s.add_argument("-n", type=int, default=10000, help="number of waveforms")
    s.add_argument("--charge", type=float, nargs=2, default=[0.5, 30.0], metavar=("LO", "HI"), help="p.e.")
    s.add_argument("--time", type=float, nargs=2, default=[-5.0, 40.0], metavar=("LO", "HI"), help="ns")
    s.add_argument("--pileup", type=float, default=0.0, help="mean number of extra pulses per waveform")
    for what in ("charge", "noise"):
        s.add_argument(
            f"--{what}-prior",
            choices=PRIORS,
            default="uniform",
            help="uniform, log(-uniform) or mixed (half each)",
        )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_simulate)

    a = sub.add_parser("analyze", help="CBAE: estimate charge/time (+sigma) and denoise waveforms")
    a.add_argument("input")
    a.add_argument("--model", default="checkpoints/cbae_default.pt")
    a.add_argument("--batch", type=int, default=65536)
    a.add_argument(
        "--refine",
        action="store_true",
        help="refine the encoder estimate by a Levenberg-Marquardt fit of the learned decoder (slower)",
    )
    a.add_argument("--refine-iter", type=int, default=6, help="LM iterations for --refine")
    a.add_argument("--device", default="cpu")
    a.add_argument("-o", "--output", required=True)
    a.set_defaults(func=cmd_analyze)

    g = sub.add_parser(
        "generate", help="waveforms from the CBAE decoder (learned response) + electronics noise"
    )
    g.add_argument("--model", default="checkpoints/cbae_default.pt")
    g.add_argument("--charge", type=float, nargs="+", required=True, help="p.e. (one or a list)")
    g.add_argument("--time", type=float, nargs="+", default=[10.0], help="ns (one or a list)")
    g.add_argument("--repeat", type=int, default=1, help="noisy copies of each (charge, time)")
    g.add_argument("--noise", default="medium", help="low|medium|high|none, factor or lo:hi")
    g.add_argument("--electronics", default=None, help="noise/ADC model (default: the model's electronics)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("-o", "--output", required=True)
    g.set_defaults(func=cmd_generate)
    return p


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``photonfit train --config configs/train/cbae.yaml [--set data.n_train=1000 ...] [--fast-dev-run]``."""
    p = subparsers.add_parser("train", help="train the CBAE (Lightning) from a YAML config")
    p.add_argument("--config", default="configs/train/cbae.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry (YAML value)")
    p.add_argument("--output", default=None, help="run directory (default: output.dir of the config)")
    p.add_argument("--fast-dev-run", action="store_true", help="one batch of train/val (smoke test)")
    p.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m training.cli``) until fitting/cli.py wires these in."""
    parser = argparse.ArgumentParser(prog="photonfit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_waveforms_parser(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
