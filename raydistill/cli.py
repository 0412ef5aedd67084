"""The `raydistill` command: distill, eval, show, presets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raydistill.config import ConfigError, load_config, preset_names


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a data set with RaT-BPTT")
    p.add_argument("--preset", default="quickstart", help="a shipped preset name or a YAML file (default: quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set ratbptt.window=40 (repeatable)")
    p.add_argument("--out", help="run directory to create (default: runs/PRESET-TIMESTAMP)")
    p.add_argument("--workers", type=int, metavar="K", help="meta-gradient workers (ray.workers)")
    p.add_argument("--mode", help="sync (average K gradients per step) or async (ray.mode)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the final test-set evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="train fresh networks on a distilled set; report test accuracy")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--arch", action="append", dest="archs", metavar="NAME",
                   help="architecture to evaluate (repeatable; default: the run's eval.archs)")
    p.add_argument("--models", type=int, help="networks per architecture (default: the run's eval.num_models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raydistill", description="Distributed dataset distillation (RaT-BPTT).")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_eval(sub)
    show = sub.add_parser("show", help="summarise a run directory")
    show.add_argument("run_dir", metavar="RUN_DIR")
    sub.add_parser("presets", help="list the shipped presets")
    return ap


def cmd_distill(args: argparse.Namespace) -> int:
    from raydistill.engine import distill_on_ray

    flags = {"ray.workers": args.workers, "ray.mode": args.mode, "ray.address": args.address}
    overrides = args.overrides + [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.resume:
        if overrides:
            raise ConfigError("--resume: a resumed run keeps its own config; drop --set/--workers/--mode/--address")
        summary = distill_on_ray(None, args.resume, resume=True, progress=not args.quiet, evaluate=not args.no_eval)
        if summary.get("finished"):
            print(f"{args.resume} is already finished; nothing to do (see: raydistill show {args.resume})")
            return 0
    else:
        cfg = load_config(args.preset, overrides)
        out = args.out or f"runs/{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = distill_on_ray(cfg, out, progress=not args.quiet, evaluate=not args.no_eval)
    print(f"run directory: {summary['run_dir']}  (see: raydistill show {summary['run_dir']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raydistill.distill import load_checked, run_evaluation
    from raydistill.models import MODELS
    from raydistill.run_dir import load_run, targets_of
    from raydistill.runtime import resolve_device, set_threads

    if args.models is not None and args.models <= 0:
        raise ConfigError(f"--models: must be > 0, got {args.models}")
    dset, cfg = load_run(args.run_dir)
    if args.archs:
        unknown = [a for a in args.archs if a not in MODELS]
        if unknown:
            raise ConfigError(f"--arch: unknown model {unknown[0]!r}; choose one of {', '.join(MODELS)}")
        cfg.eval.archs = list(args.archs)
    set_threads(cfg.threads)
    dataset = load_checked(cfg)
    run_evaluation(Path(args.run_dir), dset.images, targets_of(dset), cfg, dataset, resolve_device(cfg.device),
                   cfg.eval.archs, args.models, progress=not args.quiet)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from raydistill.artifact import summarise

    print(summarise(args.run_dir))
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    for name in preset_names():
        cfg = load_config(name, check_paths=False)
        r = cfg.ratbptt
        print(f"{name:24s} {cfg.data.name:14s} IPC {cfg.ipc:<3d} {cfg.model.name}-{cfg.model.depth} w{cfg.model.width:<4d}"
              f" T={r.unroll} W={r.window} {r.window_mode:8s} steps={cfg.steps}")
    return 0


COMMANDS = {"distill": cmd_distill, "eval": cmd_eval, "show": cmd_show, "presets": cmd_presets}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from raydistill.artifact import ArtifactError
    from raydistill.data import DataError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, ArtifactError) as exc:
        print(f"raydistill: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from raydistill.engine import EngineError

        if not isinstance(exc, EngineError):
            raise
        print(f"raydistill: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raydistill: interrupted; metrics so far are in the run directory's metrics.jsonl", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
