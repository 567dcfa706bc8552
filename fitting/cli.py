"""photonfit: simulate optical particle detectors, learn their waveform response, fit events.

Subcommands: ``simulate`` (MC events → HDF5), ``detectors`` (list presets), ``show`` (summary and event
display of a file), ``reconstruct`` (likelihood fits of events), ``pid`` (e/μ by likelihood ratio),
``waveforms`` (labelled waveform sets, CBAE analysis and generation) and ``train`` (Lightning training of
learned components). Every subcommand returns an exit status; bad arguments and configs exit with status 2
and a one-line message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from physics.config import ConfigError


def _vec3(text: str) -> list[float] | None:
    if text == "random":
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected 'x,y,z' numbers or 'random'") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected 3 comma-separated numbers or 'random'")
    return vals


def _cmd_simulate(args: argparse.Namespace) -> int:
    from physics.io import write_run
    from physics.simulate import SimConfig, Simulator

    cfg = SimConfig(
        detector=args.detector,
        medium=args.medium,
        sensors=args.sensors,
        electronics=args.electronics,
        particle=args.particle,
        energy=args.energy,
        vertex=args.vertex,
        direction=args.direction,
        n_photons=args.photons,
        waveforms=args.waveforms,
        keep_photons=args.keep_photons,
    )
    sim = Simulator(cfg, device=args.device)
    t0 = time.perf_counter()
    res = sim.run(args.events, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    dt = time.perf_counter() - t0
    write_run(
        args.output,
        config=sim.config_dict(),
        seed=args.seed,
        truth=res["truth"],
        hits=res["hits"],
        n_events=args.events,
        photons=res.get("photons"),
        waveforms=res.get("waveforms"),
        detector=sim.detector,
        sensors=sim.sensors,
        overwrite=args.overwrite,
    )
    n_hits = len(res["hits"])
    what = f"{args.photons:g} photons" if args.particle in ("isotropic", "laser") else f"{args.energy:g} MeV"
    print(
        f"simulated {args.events} {args.particle} events ({what}) in {sim.detector.name}: "
        f"{n_hits / args.events:.1f} hit PMTs/event, {float(res['hits'].charge.sum()) / args.events:.1f} "
        f"p.e./event, {dt:.2f} s → {args.output}"
    )
    return 0


def _cmd_detectors(args: argparse.Namespace) -> int:
    from physics.geometry import list_presets

    rows = list_presets()
    print(f"{'name':<8} {'shape':<9} {'radius_m':>9} {'height_m':>9} {'n_pmts':>8} {'coverage':>9}")
    for r in rows:
        h = "-" if r.height is None else f"{r.height:.2f}"
        cov = 100 * r.photocoverage
        print(f"{r.name:<8} {r.shape:<9} {r.radius:>9.2f} {h:>9} {r.n_pmts:>8d} {cov:>8.1f}%")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from physics.display import event_display, summary
    from physics.io import read_run

    run = read_run(args.file, run=args.run)
    print(summary(run))
    if args.png:
        event_display(run, args.event, args.png)
        print(f"event display of event {args.event} → {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="photonfit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="Monte-Carlo events → HDF5 (hits, optional waveforms)")
    s.add_argument("-o", "--output", default="events.h5", help="output HDF5 file (written atomically)")
    s.add_argument("--detector", default="wcte", help="preset name or detector YAML (default wcte)")
    s.add_argument("--medium", default="water", help="medium preset or YAML")
    s.add_argument("--sensors", default="auto", help="PMT model preset or YAML; auto = by PMT size")
    s.add_argument("--electronics", default="default", help="electronics preset or YAML")
    s.add_argument("--particle", default="mu-", help="mu-, mu+, pi-, pi+, e-, e+, gamma, isotropic, laser")
    s.add_argument("--energy", type=float, default=500.0, help="kinetic energy [MeV]")
    s.add_argument("--photons", type=float, default=1e5, help="mean photons per event for sources")
    s.add_argument("--vertex", type=_vec3, default=None, help="x,y,z [m] or 'random' (default: random)")
    s.add_argument("--direction", type=_vec3, default=None, help="dx,dy,dz or 'random' (default: random)")
    s.add_argument("--events", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--batch-size", type=int, default=16, help="events simulated together")
    s.add_argument("--waveforms", action="store_true", help="also digitise waveforms of hit PMTs")
    s.add_argument("--keep-photons", action="store_true", help="store photocathode hits")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_simulate)

    d = sub.add_parser("detectors", help="list detector presets with PMT counts and photocoverage")
    d.set_defaults(func=_cmd_detectors)

    sh = sub.add_parser("show", help="summary of a photonfit HDF5 file; optional event display PNG")
    sh.add_argument("file")
    sh.add_argument("--run", default=None, help="run group (default: the only/first run)")
    sh.add_argument("--event", type=int, default=0)
    sh.add_argument("--png", default=None, help="write an event display of --event to this PNG")
    sh.set_defaults(func=_cmd_show)

    from training.cli import add_train_parser, add_waveforms_parser

    from .pid import add_pid_parser
    from .reconstruct import add_reconstruct_parser

    add_reconstruct_parser(sub)
    add_pid_parser(sub)
    add_waveforms_parser(sub)
    add_train_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"photonfit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
