"""RaT-BPTT, DM, CAFE, DC, DSA, FRePo, RFAD and KIP on Fashion-MNIST (ConvNet-3) at the same wall-clock distillation
budget.

    python benchmarks/bench_methods.py --budget-s 900               # IPC 1 and 10, every method, then the evaluation
    python benchmarks/bench_methods.py --dc-schedule --dc-steps 40  # DC: the seeded episode vs the original schedule
    options: --ipcs 1,10  --methods ratbptt,dm,cafe,dc,dsa,frepo,rfad,kip  --set KEY=VALUE (every run, e.g. model.width=32; a key in a
             method's section, e.g. dc.batch_real=64, only that method's runs)
             --eval-steps 1000  --eval-models 5  --eval-recipe sgd  --calib-steps 4  --threads 2  --out FILE

Each method runs its own Fashion-MNIST preset (RaT-BPTT: its CPU recipe, the quickstart preset at the IPC; the others:
{method}-fashion-mnist-ipc{1,10}), in process (the single-machine algorithm), with `threads` torch threads and no validation during the run.

The budget: the engine has no wall-clock stop, so every method is calibrated first. A scratch run of --calib-steps
steps is timed from its records (`seconds` per step, the first left out as warm-up); the expected seconds per step are
their mean, except for DC, DSA and CAFE, whose step cost grows with the episode's network epochs, and FRePo, whose
step cost grows with its pool member's age: there a line seconds = a + b x work is fitted and read at the mean work,
(outer_loop - 1) / 2 x inner_loop epochs or (max_online_steps - 1) / 2 network steps (the plain mean when the
calibration saw only one value). The real run then gets max(1, floor(budget / expected)) steps from a
fresh start. The calibration is not counted; the real run's measured distillation time is recorded beside the budget,
so any miss is visible. A run that takes more than 1.2 x the budget or less than budget / 1.2 (another job on the machine
or a slow warm-up skewed the calibration, say) is done again once, with the step count its own records give; the
first attempt is kept under timing.redone.

Running a subset (--methods dm --ipcs 1) at the same --budget-s updates those entries of an existing results file and
keeps the others; the baselines are recomputed (the same seeds give the same figures). --evaluate-runs DIR evaluates
the runs an earlier invocation left in DIR again, without distilling (after a change to the protocol, say).

The fair evaluation: one protocol for every set, whatever its preset says: --eval-models ConvNet-3s with instance norm
(the run's width)
trained with --eval-recipe (sgd: DC's evaluate_synset, lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half time;
adam: lr 1e-3) for --eval-steps batches of 256 with DSA's augmentation, paired seeds across sets; beside them the
real-image baselines random, herding and k-center (each trained with and without augmentation; the better is shown).

--dc-schedule: for each IPC, --dc-steps image updates of DC (its preset) two ways from the same initial set: the
engine's seeded episode (a fresh network per step at a seeded position) and `raydistill.methods.dc.original`, the
published loop (one network trained along between outer iterations); both evaluated with the protocol above.

Writes benchmarks/results/methods.json (each mode updates its own section, "budget" or "dc_schedule").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_tune import REPO, machine  # noqa: E402

from raydistill.setup import load_config  # noqa: E402
from raydistill.config.schema import AugmentConfig, DistillConfig, EvalConfig  # noqa: E402
from raydistill.data.registry import load_dataset  # noqa: E402
from raydistill.engine.driver import distill  # noqa: E402
from raydistill.engine.worker import method_resources  # noqa: E402
from raydistill.evaluate.report import NETWORK_SEED, ReportOptions, evaluation_report  # noqa: E402
from raydistill.evaluate.train import Accuracy, NetworkSpec, network_accuracy  # noqa: E402
from raydistill.storage import run_dir as rundir  # noqa: E402
from raydistill.storage.artifact import read_distilled  # noqa: E402
from raydistill.methods.base import IMAGES  # noqa: E402
from raydistill.methods.dc.original import ImageSgd, original_schedule  # noqa: E402
from raydistill.methods.matching import resolved_loops  # noqa: E402
from raydistill.methods.registry import get_method  # noqa: E402
from raydistill.runtime import resolve_device  # noqa: E402
from raydistill.synset.synthetic import init_synthetic  # noqa: E402

METHODS = ("ratbptt", "dm", "cafe", "dc", "dsa", "frepo", "rfad", "kip")
EPISODIC = ("cafe", "dc", "dsa")  # step cost grows with the episode's network epochs
AGED = ("frepo",)  # step cost grows with the pool member's age (network steps)
MISS = 1.2  # a budgeted run that takes more than this x the budget, or less than the budget / this, is redone
DSA_STRATEGIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def preset_of(method: str, ipc: int) -> str:
    """RaT-BPTT runs its CPU recipe (the quickstart preset: T 40, W 15, real batch 256, meta lr 0.01) at the IPC: its
    paper-scale presets (T 200, real batch 5000) would get a handful of steps in a CPU budget. The others run their
    published Fashion-MNIST settings."""
    return "quickstart" if method == "ratbptt" else f"{method}-fashion-mnist-ipc{ipc}"


def config(method: str, ipc: int, args: argparse.Namespace, *more: str) -> DistillConfig:
    """The method's preset with the common overrides; a --set on a method's section (dm.batch_real=...) applies to
    that method only."""
    mine = [o for o in args.set if o.split(".", 1)[0] not in METHODS or o.split(".", 1)[0] == method]
    overrides = ["eval.every=0", f"threads={args.threads}", "ray.workers=1", f"ipc={ipc}", *mine, *more]
    return load_config(preset_of(method, ipc), overrides)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "meta_loss" in r]


def seconds_per_step(cfg: DistillConfig, rows: list[dict]) -> dict:
    """The expected seconds of one step from a calibration run's records (see the module docstring); with three or
    more, the first is left out (it pays one-off warm-up)."""
    rows = rows[1:] if len(rows) >= 3 else rows
    secs = np.array([r["seconds"] for r in rows], dtype=float)
    out = {"calib_steps": len(rows), "calib_seconds": secs.round(3).tolist(), "expected_s": float(secs.mean())}
    if cfg.method in EPISODIC:
        outer, inner = resolved_loops(cfg.method_config, cfg.ipc)
        key, mean_work = "net_epochs", (outer - 1) / 2 * inner
    elif cfg.method in AGED:
        key, mean_work = "age", (cfg.method_config.max_online_steps - 1) / 2
    else:
        return out
    work = np.array([np.mean([s[key] for s in r["stats"]]) for r in rows], dtype=float)
    out.update({f"calib_{key}": work.tolist(), f"mean_{key}": mean_work})
    if len(set(work.tolist())) > 1:
        slope, intercept = np.polyfit(work, secs, 1)
        out["expected_s"] = float(max(intercept + slope * mean_work, secs.min()))
        unit = {"net_epochs": "net_epoch", "age": "net_step"}[key]
        out["fit"] = {"intercept_s": float(intercept), f"s_per_{unit}": float(slope)}
    return out


def run(cfg: DistillConfig, out: Path) -> tuple[Path, float]:
    began = time.perf_counter()
    distill(cfg, out, in_process=True, progress=False, evaluate=False)
    return out, time.perf_counter() - began


def eval_config(cfg: DistillConfig, args: argparse.Namespace) -> DistillConfig:
    """The one evaluation protocol, whatever network a method distilled with: ConvNet-3 with instance norm at the
    run's width (the evaluation network of DC, DSA, DM and CAFE; FRePo, RFAD and KIP distil without normalisation)."""
    lr = 0.01 if args.eval_recipe == "sgd" else 1e-3
    ev = EvalConfig(num_models=args.eval_models, steps=args.eval_steps, lr=lr, batch_size=256, recipe=args.eval_recipe,
                    archs=["convnet"], baselines=["random", "herding", "kcenter"])
    model = dataclasses.replace(cfg.model, name="convnet", depth=3, norm="instance")
    return dataclasses.replace(cfg, model=model, eval=ev, augment=AugmentConfig(strategies=list(DSA_STRATEGIES)),
                               seed=0)


def distilled_accuracy(x: torch.Tensor, targets: torch.Tensor, dataset, ecfg: DistillConfig,
                       device: torch.device) -> dict:
    """Test accuracy of ecfg.eval.num_models ConvNets trained on the set: the seeds evaluation_report pairs."""
    accs = [network_accuracy(x, targets, dataset.test_x, dataset.test_y,
                             NetworkSpec("convnet", dataset.num_classes, ecfg.seed + NETWORK_SEED + i, ecfg.eval.steps,
                                         True), ecfg, device)
            for i in range(ecfg.eval.num_models)]
    return dataclasses.asdict(Accuracy.of(accs))


def budget_mode(args: argparse.Namespace, scratch: Path, device: torch.device, previous: dict | None) -> dict:
    """Every method of --methods at every IPC of --ipcs; a section of an earlier run with the same budget keeps the
    methods this run does not redo (the baselines are recomputed: the same seeds give the same figures)."""
    same = previous is not None and previous.get("budget_s") == args.budget_s
    section: dict = previous if same else {"budget_s": args.budget_s, "ipcs": {}}
    for ipc in args.ipcs:
        entry: dict = section["ipcs"].get(str(ipc), {"methods": {}})
        sets = {}
        for method in args.methods:
            cfg = config(method, ipc, args)
            if args.evaluate_runs is not None:  # evaluate an earlier invocation's runs again; their records stay
                done = [args.evaluate_runs / f"{method}-{ipc}{s}" for s in ("-redo", "")]
                dset = read_distilled(next(d for d in done if d.exists()) / "distilled.parquet")
                sets[method] = (dset.images, rundir.targets_of(dset), cfg)
                continue
            calib_cfg = dataclasses.replace(cfg, steps=args.calib_steps)
            calib, _ = run(calib_cfg, scratch / f"calib-{method}-{ipc}")
            timing = seconds_per_step(cfg, records(calib))
            steps = max(1, math.floor(args.budget_s / timing["expected_s"]))
            out, wall = run(dataclasses.replace(cfg, steps=steps), scratch / f"{method}-{ipc}")
            rows = records(out)
            if not args.budget_s / MISS < wall < MISS * args.budget_s:
                # The calibration was off (another job on the machine, or warm-up, say): redo the run once with the
                # step count its own records give, so no method gets more or less time than the others.
                measured = float(np.mean([r["seconds"] for r in rows[1:] or rows]))
                timing["redone"] = {"steps": steps, "wall_s": round(wall, 1), "measured_s": measured}
                steps = max(1, math.floor(args.budget_s / measured))
                out, wall = run(dataclasses.replace(cfg, steps=steps), scratch / f"{method}-{ipc}-redo")
                rows = records(out)
            dset = read_distilled(out / "distilled.parquet")
            sets[method] = (dset.images, rundir.targets_of(dset), cfg)
            entry["methods"][method] = {
                "preset": preset_of(method, ipc), "overrides": args.set, "steps": steps, "timing": timing,
                "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
                "distill_seconds": dset.metadata.get("distill_seconds"), "wall_s": round(wall, 1),
                "meta_loss_first": rows[0]["meta_loss"], "meta_loss_last": rows[-1]["meta_loss"]}
            nets = [s["net_seconds"] for r in rows for s in r["stats"] if "net_seconds" in s]
            if nets:  # FRePo: the share of the step spent training its pool member (the seeded pool's cost)
                entry["methods"][method]["pool_training_share"] = round(sum(nets) / sum(r["seconds"] for r in rows), 3)
            print(f"ipc {ipc} {method}: {steps} steps in {wall:.0f} s (budget {args.budget_s:g} s)", flush=True)
        first = next(iter(sets))
        dataset = load_dataset(sets[first][2].data)
        ecfg = eval_config(sets[first][2], args)
        report = evaluation_report(sets[first][0], sets[first][1], ipc, dataset, ecfg, ReportOptions(device=device))
        entry["eval"] = {k: report[k] for k in ("split", "num_models", "steps", "recipe", "lr", "augment")}
        entry["baselines"] = {name: by_arch["convnet"] for name, by_arch in report["baselines"].items()}
        for method, (x, targets, _) in sets.items():
            acc = report["results"]["convnet"] if method == first else distilled_accuracy(x, targets, dataset, ecfg,
                                                                                        device)
            entry["methods"][method]["test_acc"] = acc
            print(f"ipc {ipc} {method}: {acc['mean']:.2f} +- {acc['std']:.2f} %", flush=True)
        section["ipcs"][str(ipc)] = entry
    return section


def dc_schedule_mode(args: argparse.Namespace, scratch: Path, device: torch.device) -> dict:
    section: dict = {"steps": args.dc_steps, "ipcs": {}}
    torch.set_num_threads(args.threads)
    for ipc in args.ipcs:
        cfg = config("dc", ipc, args, f"steps={args.dc_steps}")
        out, wall_episode = run(cfg, scratch / f"dc-episode-{ipc}")
        episode = read_distilled(out / "distilled.parquet")
        dataset = load_dataset(cfg.data)
        method = get_method("dc")
        ctx = method.setup(cfg, method_resources(cfg, dataset, method.needs, device))
        syn = init_synthetic(cfg, dataset, method)  # the engine's initial set: the same start for both
        began = time.perf_counter()
        images, losses = original_schedule(ctx, syn.learnables[IMAGES].to(device), syn.hard_labels.to(device),
                                           args.dc_steps, ImageSgd(cfg.meta.lr, cfg.meta.momentum), seed=cfg.seed)
        wall_original = time.perf_counter() - began
        ecfg = eval_config(cfg, args)
        outer, inner = resolved_loops(cfg.method_config, ipc)
        section["ipcs"][str(ipc)] = {
            "preset": preset_of("dc", ipc), "overrides": args.set, "loops": [outer, inner],
            "seeded_episode": {"wall_s": round(wall_episode, 1), "losses": [r["meta_loss"] for r in records(out)],
                               "episodes": [r["stats"][0]["episode"] for r in records(out)],
                               "test_acc": distilled_accuracy(episode.images, episode.labels, dataset, ecfg, device)},
            "original": {"wall_s": round(wall_original, 1), "losses": losses,
                         "test_acc": distilled_accuracy(images.cpu(), syn.hard_labels, dataset, ecfg, device)},
            "eval": {"num_models": ecfg.eval.num_models, "steps": ecfg.eval.steps, "recipe": ecfg.eval.recipe},
        }
        row = section["ipcs"][str(ipc)]
        print(f"dc ipc {ipc}: seeded episode {row['seeded_episode']['test_acc']['mean']:.2f} % "
              f"({wall_episode:.0f} s), original {row['original']['test_acc']['mean']:.2f} % "
              f"({wall_original:.0f} s)", flush=True)
    return section


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=900.0, help="distillation seconds per method and IPC")
    ap.add_argument("--dc-schedule", action="store_true", help="compare DC's seeded episode with the original schedule")
    ap.add_argument("--dc-steps", type=int, default=40, help="image updates per DC schedule (--dc-schedule)")
    ap.add_argument("--ipcs", default="1,10", help="images per class, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--calib-steps", type=int, default=4, help="timed steps per method before the budgeted run")
    ap.add_argument("--eval-steps", type=int, default=1000, help="training batches per evaluation network")
    ap.add_argument("--eval-models", type=int, default=5, help="networks per set")
    ap.add_argument("--eval-recipe", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "methods.json")
    ap.add_argument("--evaluate-runs", type=Path, default=None, metavar="DIR",
                    help="evaluate the runs an earlier invocation left in DIR (its 'runs in' folder) again, "
                         "without distilling; their entries in --out keep their records")
    args = ap.parse_args()
    args.ipcs = [int(k) for k in args.ipcs.split(",") if k]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    device = resolve_device("auto")
    scratch = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    body = json.loads(args.out.read_text()) if args.out.exists() else {}
    body.update(machine=machine(), date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv))
    if args.dc_schedule:
        body["dc_schedule"] = {**dc_schedule_mode(args, scratch, device), "command": body["command"]}
    else:
        body["budget"] = {**budget_mode(args, scratch, device, body.get("budget")), "command": body["command"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {args.out} (runs in {scratch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
