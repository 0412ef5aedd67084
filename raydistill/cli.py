"""The `raydistill` command: distill, boost, eval, tune, prepare, plan, show, export, presets."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from raydistill.config import ConfigError, DistillConfig
from raydistill.config.loading import preset_names
from raydistill.data.prepare import PrepareOptions, prepare
from raydistill.data.registry import DataError
from raydistill.engine.boost import boost, evaluate_budgets
from raydistill.engine.driver import EngineError, Hooks, distill
from raydistill.engine.memory import machine_memory
from raydistill.evaluate.results import EvalOptions, run_evaluation
from raydistill.methods.registry import allow_import_path, get_method
from raydistill.models.registry import MODELS
from raydistill.plan import GPUS, Device, gpu, gpu_of_size, parse_memory, plan, plan_data, suggest
from raydistill.plan.check import FIT_MODES
from raydistill.plan.presets import cache_file, cached_peaks
from raydistill.plan.report import render
from raydistill.runtime import set_threads
from raydistill.setup import config_from_dict, config_to_dict, load_checked, load_config
from raydistill.storage.artifact import ArtifactError, read_distilled, write_distilled
from raydistill.storage.run_dir import ARTIFACT, CONFIG, load_run, targets_of
from raydistill.storage.store import Location, location, one_line
from raydistill.synset.blocks import schedule
from raydistill.tune import Interrupted, run_sweep
from raydistill.watch.console import console
from raydistill.watch.summary import summarise


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What distill and boost share: config, output, cluster, resume."""
    p.add_argument("--preset", default="quickstart", help="a shipped preset name or a YAML file (default: quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set ratbptt.window=40 (repeatable)")
    p.add_argument("--out", help="run directory to create: a path or a URI such as file:///shared/run or "
                                 "s3://bucket/run (default: runs/PRESET-TIMESTAMP)")
    p.add_argument("--workers", type=int, metavar="K", help="meta-gradient workers (ray.workers)")
    p.add_argument("--mode", help="sync (average K gradients per step) or async (ray.mode)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint (a path "
                                                       "or the URI it was started with)")
    p.add_argument("--no-eval", action="store_true", help="skip the final test-set evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_log_every(p)
    p.add_argument("--in-process", action="store_true",
                   help="run the server and workers in this process instead of on Ray (debugging, notebooks)")
    p.add_argument("--fit", choices=FIT_MODES, default="check",
                   help="the memory check before the run starts: check (stop with the setting that would fit), auto "
                        "(apply it and say so) or off (default: check)")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    _add_run_args(sub.add_parser("distill", help="distil a data set (method: ratbptt by default)"))


def _add_boost(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boost", help="Boost-DD: distil nested blocks, so every prefix is a distilled set")
    _add_run_args(p)
    p.add_argument("--block", type=int, metavar="B", help="images per class in each block (boost.stages)")
    p.add_argument("--blocks", type=int, metavar="J", help="number of blocks")
    p.add_argument("--beta", type=float, default=0.1, help="earlier blocks' meta lr multiplier; 0 freezes them")
    p.add_argument("--steps-per-block", type=int, metavar="N", help="meta-steps per stage (default: the preset's steps)")
    p.add_argument("--budgets", help="IPC budgets to evaluate, e.g. 1,2,5 (default: every stage's cumulative IPC)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="train fresh networks on a distilled set; report test accuracy")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--arch", action="append", dest="archs", metavar="NAME",
                   help="architecture to evaluate (repeatable; default: the run's eval.archs)")
    p.add_argument("--models", type=int, help="networks per architecture (default: the run's eval.num_models)")
    p.add_argument("--budgets", help="evaluate the nested prefixes of these IPCs, e.g. 1,2,5,10 (boosted sets)")
    p.add_argument("--method", metavar="PACKAGE.MODULE:CLASS",
                   help="the run's method, when it is named by import path (a file never makes raydistill import)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_log_every(p)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0, e.g. 30")
    return value


def _add_log_every(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-every", type=_seconds, metavar="SECONDS",
                   help="when the output is not a terminal (a log file, a Ray job), one compact progress line "
                        "every SECONDS instead of a progress bar (default: 30)")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="run a Ray Tune sweep described by a YAML file (see tune_configs/)")
    p.add_argument("sweep", metavar="SWEEP_YAML", help="e.g. tune_configs/fmnist-window-unroll.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, the others go on from checkpoints. "
                        "Tune unpickles the experiment's saved state: resume only from storage you trust")
    p.add_argument("--out", help="folder for results.csv, best.yaml and plot.png (default: the experiment folder)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no Tune status tables")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict each process's peak memory for a config, and whether it fits a device")
    p.add_argument("--preset", default="quickstart", help="a shipped preset name or a YAML file (default: quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", help=f"plan for one GPU of this model: {', '.join(GPUS)}")
    device.add_argument("--gpu-memory", metavar="SIZE", help="plan for a GPU with this much memory, e.g. 24GiB")
    device.add_argument("--cpu-memory", metavar="SIZE",
                        help="plan for CPU workers with this much memory each (default: this machine's memory "
                             "divided by ray.workers)")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode, resize and shard a data set once into Parquet (data.name: parquet)")
    p.add_argument("source", metavar="SOURCE",
                   help="an image folder (train/<class>/*, val/<class>/*) or a built-in data set name, e.g. "
                        "fashion-mnist")
    p.add_argument("--out", required=True, metavar="DEST", help="a new folder or URI (file://, s3://, ...) to write")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="store N x N images: the centred square, resized (required for an image folder)")
    p.add_argument("--classes", metavar="FILE|N|SUBSET",
                   help="keep these classes: a file of class folder names (one a line), the first N in sorted "
                        "order, or a shipped subset (imagenette, imagewoof, imagenet100, ...)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="about this many MiB of pixels per shard "
                                                                  "(default: 256)")
    p.add_argument("--root", help="a built-in data set's folder (default: its usual location)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raydistill", description="Distributed dataset distillation (RaT-BPTT).")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_distill(sub)
    _add_boost(sub)
    _add_eval(sub)
    _add_tune(sub)
    _add_prepare(sub)
    _add_plan(sub)
    show = sub.add_parser("show", help="summarise a run directory")
    show.add_argument("run_dir", metavar="RUN_DIR")
    export = sub.add_parser("export", help="write (a prefix of) a distilled set as a standalone Parquet file")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--prefix", type=int, metavar="K", help="keep the first K images per class (block order)")
    export.add_argument("--out", required=True, help="the Parquet file to write")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    sub.add_parser("presets", help="list the shipped presets")
    return ap


def _check_in_process(args: argparse.Namespace) -> None:
    if args.in_process and args.address is not None:
        raise ConfigError("--in-process: runs without Ray, so --address has nothing to join; drop one of the two")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The config changes the flags ask for; with --resume, `--set method=NAME` restates the run's own method (so
    a method named by import path may be imported: raydistill.methods.registry) and is no change."""
    if args.resume:
        for text in [o for o in args.overrides if o.startswith("method=")]:
            allow_import_path(text[len("method="):])
            args.overrides.remove(text)
    flags = {"ray.workers": args.workers, "ray.mode": args.mode, "ray.address": args.address}
    return args.overrides + [f"{key}={value}" for key, value in flags.items() if value is not None]


def _default_out(args: argparse.Namespace) -> str:
    """The run directory to create; remembered on `args`, so an interruption can name the resume command."""
    args.run_dir = args.out or f"runs/{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args.run_dir


def _budgets(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--budgets: {text!r} is not a comma-separated list of integers, e.g. 1,2,5") from None


def _finished(summary: dict, run: str) -> bool:
    if summary.get("finished"):
        print(f"{run} is already finished; nothing to do (see: raydistill show {run})")
    return bool(summary.get("finished"))


def _start_or_resume(args: argparse.Namespace, run: Callable[..., dict], new_config: Callable[[], DistillConfig],
                     changes: str, **extra) -> int:
    """`run` (distill or boost) on a new config into a new directory, or with --resume on the run's own config.

    `changes` names the flags given that would change a config (a resumed run keeps its own), "" when none were.
    """
    _check_in_process(args)
    options = dict(progress=not args.quiet, evaluate=not args.no_eval, in_process=args.in_process,
                   hooks=Hooks(fit=args.fit), **extra)
    if args.resume:
        if changes:
            raise ConfigError(f"--resume: a resumed run keeps its own config; drop {changes}")
        summary = run(None, args.resume, resume=True, **options)
        if _finished(summary, args.resume):
            return 0
    else:
        summary = run(new_config(), _default_out(args), **options)
    print(f"run directory: {summary['run_dir']}  (see: raydistill show {summary['run_dir']})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    changes = "--set/--workers/--mode/--address" if overrides else ""
    return _start_or_resume(args, distill, lambda: load_config(args.preset, overrides), changes)


def cmd_boost(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    changes = "--set/--block/--blocks/--workers" if overrides or args.block or args.blocks else ""

    def new_config() -> DistillConfig:
        if (args.block is None) != (args.blocks is None):
            raise ConfigError("--block/--blocks: give both (e.g. --block 1 --blocks 5), or neither to use the "
                              "preset's boost.stages")
        cfg = load_config(args.preset, overrides)
        if args.block is not None:
            steps = args.steps_per_block if args.steps_per_block is not None else cfg.steps
            cfg.boost.stages = schedule(args.block, args.blocks, args.beta, steps)
            cfg = config_from_dict(config_to_dict(cfg))  # the flags are validated like any field
        return cfg

    return _start_or_resume(args, boost, new_config, changes, budgets=_budgets(args.budgets))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.models is not None and args.models <= 0:
        raise ConfigError(f"--models: must be > 0, got {args.models}")
    allow_import_path(args.method)
    dset, cfg = load_run(args.run_dir)
    if args.archs:
        unknown = [a for a in args.archs if a not in MODELS]
        if unknown:
            raise ConfigError(f"--arch: unknown model {unknown[0]!r}; choose one of {', '.join(MODELS)}")
        cfg.eval.archs = list(args.archs)
    set_threads(cfg.threads)
    dataset = load_checked(cfg)
    if tuple(dset.images.shape[1:]) != tuple(dataset.image_shape):
        raise ArtifactError(f"{args.run_dir}: its images are {'x'.join(map(str, dset.images.shape[1:]))} but "
                            f"{cfg.data.name} has {'x'.join(map(str, dataset.image_shape))}; the artifact does not "
                            "belong to its own config")
    if args.budgets is not None:
        evaluate_budgets(location(args.run_dir), cfg, dataset, _budgets(args.budgets),
                         EvalOptions(cfg.eval.archs, args.models, progress=not args.quiet))
        return 0
    run_evaluation(location(args.run_dir), dset.images, targets_of(dset), cfg, dataset,
                   EvalOptions(cfg.eval.archs, args.models, progress=not args.quiet, on_ray=False))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    summary = run_sweep(args.sweep, resume=args.resume, out=args.out, address=args.address,
                        verbose=0 if args.quiet else 1)
    if summary["best"] is None:
        print("raydistill: error: no trial finished; see the status column above and results.csv", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    options = PrepareOptions(image_size=args.image_size, classes=args.classes, shard_mb=args.shard_mb, root=args.root)
    manifest = prepare(args.source, args.out, options, address=args.address, progress=not args.quiet)
    splits = manifest["splits"]
    shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {args.out}: {splits['train']['count']} train + {splits['test']['count']} test images of "
          f"{'x'.join(map(str, manifest['image_shape']))}, {len(manifest['classes'])} classes, {shards} shards, "
          f"{manifest['skipped']['count']} skipped (use: --set data.name=parquet --set data.root={args.out})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(summarise(args.run_dir))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = location(args.out)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory; name the Parquet file to write, e.g. {out / 'ipc1.parquet'}")
    if out.exists() and not args.force:
        raise ConfigError(f"--out: {out} already exists; choose another file, or pass --force to replace it")
    if not isinstance(out, Location) and not out.parent.is_dir():  # object stores have no folders to create
        raise ConfigError(f"--out: folder {out.parent} does not exist; create it or choose another path")
    dset = read_distilled(location(args.run_dir) / ARTIFACT)
    if args.prefix is not None:
        if not 1 <= args.prefix <= dset.ipc:
            raise ConfigError(f"--prefix: {args.prefix} is not between 1 and the set's IPC {dset.ipc}")
        dset = dset.prefix(args.prefix)
    write_distilled(out, dset)
    print(f"wrote {args.out}: {len(dset.labels)} images, IPC {dset.ipc}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    def planning(name: str) -> None:
        print(f"planning {name} (once; kept in {cache_file()})", file=sys.stderr, flush=True)

    peaks = cached_peaks(progress=planning)
    print(f"{'preset':28s} {'data':14s} {'IPC':>4s}  {'model':18s} {'peak per worker':>22s}  method")
    for name in preset_names():
        cfg = load_config(name, check_paths=False)
        method = get_method(cfg.method).describe(cfg.method_config)
        peak = peaks[name]
        print(f"{name:28s} {cfg.data.name:14s} {cfg.ipc:4d}  {cfg.model.name}-{cfg.model.depth} w{cfg.model.width:<7d} "
              f"{peak:>22s}  {method} steps={cfg.steps}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides, check_paths=False)
    if args.gpu:
        device = gpu(args.gpu).shared(cfg.ray.gpus_per_worker)
    elif args.gpu_memory:
        device = gpu_of_size(parse_memory(args.gpu_memory)).shared(cfg.ray.gpus_per_worker)
    else:
        memory = parse_memory(args.cpu_memory, "--cpu-memory") if args.cpu_memory else \
            machine_memory() // cfg.ray.workers
        device = Device("CPU workers" if args.cpu_memory else "this machine's CPU per worker", "cpu", memory)
    result = plan(cfg, plan_data(cfg), device, count_flops=True)
    print(render(result, suggest(result), Path(args.preset).stem))
    return 0 if result.fits is not False else 1


COMMANDS = {"distill": cmd_distill, "boost": cmd_boost, "eval": cmd_eval, "show": cmd_show, "export": cmd_export,
            "presets": cmd_presets, "tune": cmd_tune, "prepare": cmd_prepare, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with console(getattr(args, "log_every", None)):
            return COMMANDS[args.command](args)
    except (ConfigError, DataError, ArtifactError) as exc:
        print(f"raydistill: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"raydistill: {exc}", file=sys.stderr)
        return 130
    except EngineError as exc:
        print(f"raydistill: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # storage that fails under a command (a URI without network or credentials, a full disk)
        print(f"raydistill: error: {one_line(exc)}; check the location, its permissions and credentials",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run = getattr(args, "run_dir", None) or getattr(args, "resume", None)
        if args.command in ("distill", "boost") and run and _holds_config(run):
            command = f"raydistill {args.command} --resume {run}"
            print(f"raydistill: run interrupted; continue it with: {command}", file=sys.stderr)
        else:
            print("raydistill: interrupted before anything was written; nothing to resume", file=sys.stderr)
        return 130


def _holds_config(run: str) -> bool:
    try:
        return (location(run) / CONFIG).is_file()
    except (OSError, ConfigError):
        return False


if __name__ == "__main__":
    sys.exit(main())
