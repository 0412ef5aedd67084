"""Simulated multi-node Ray clusters for tests/integration/test_cluster.py and test_shared_storage_cluster.py:
`python tests/helpers/cluster_scenarios.py SCENARIO OUTDIR`.

Each scenario builds a `ray.cluster_utils.Cluster` (several raylets on this machine), connects to it, runs a tiny
distillation and writes what it saw to OUTDIR/result.json ({"error": traceback} when something raised); the cluster is
always shut down. It runs in its own process because the test session has a Ray instance of its own.

Scenarios:
  gpu-placement  a head without GPUs and a node with one logical GPU: the worker must land on the GPU node, and two
                 workers (one GPU each) must be refused at once.
  node-loss      a head for the parameter server and two 2-CPU worker nodes: the node that hosts the workers is removed
                 mid-run; the workers must come back on the other node and no step may be lost or applied twice.
  shared-storage the run directory is a file:// URI to a shared folder; the parameter server is killed until Ray
                 restarts it on another node, and it must resume from the checkpoint in that folder each time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)  # connect() must reuse this script's cluster, never another one
# Every simulated node binds to 127.0.0.1, and Ray must not "resolve" a loopback address to the machine's own IP
# when the driver joins (it does so only where multi-node clusters are enabled, which is what this switch turns off).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from raydistill.compat import loopback_init_kwargs  # noqa: E402
from raydistill.config import ConfigError  # noqa: E402
from raydistill.setup import load_config  # noqa: E402
import raydistill.engine.driver as engine  # noqa: E402
from raydistill.engine.driver import Hooks, distill  # noqa: E402
from raydistill.engine.server import ParameterServer  # noqa: E402
from raydistill.engine.worker import GradientWorker  # noqa: E402

TINY = ["ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64", "eval.every=0",
        "threads=1", "ray.worker_threads=1", "ray.cpus_per_worker=1", "ray.checkpoint_every=2",
        "ray.placement_timeout_s=60"]
NODE = {"object_store_memory": 100 * 2**20,  # per raylet; the default 150 MiB x 3 nodes is more than we need
        "node_ip_address": "127.0.0.1"}  # every simulated node binds to loopback only
HEAD = {**NODE, "include_dashboard": False}


def tiny(*more: str):
    return load_config("quickstart", TINY + list(more))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def append_line(path: str, record: dict) -> None:
    with open(path, "a") as f:  # one short O_APPEND write per line: concurrent writers do not interleave
        f.write(json.dumps(record) + "\n")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# These subclasses live in __main__, so Ray ships them by value; the class attribute travels with them.

class RecordsItsNode(GradientWorker):
    """A worker that appends {node_id, pid, time} to `log` once it is ready (after every (re)start)."""

    log = ""

    def __init__(self, *args):
        super().__init__(*args)
        append_line(self.log, {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                               "time": time.time()})


class ServerRecordsItsNode(ParameterServer):
    log = ""

    def __init__(self, *args):
        super().__init__(*args)
        append_line(self.log, {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                               "time": time.time(), "restored_step": self.restored_step, "run_dir": args[1],
                               "checkpoints": str(self.checkpoints)})


def connect(cluster: Cluster) -> None:
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=True, **loopback_init_kwargs())


def node_ids(cluster: Cluster) -> dict:
    return {"head": cluster.head_node.node_id, "others": [n.node_id for n in cluster.worker_nodes]}


# ---------------------------------------------------------------------------------------------- scenarios


def gpu_placement(out: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "num_cpus": 2, "num_gpus": 0})
    try:
        gpu_node = cluster.add_node(**NODE, num_cpus=1, num_gpus=1)  # a logical GPU: no CUDA behind it
        connect(cluster)
        began = time.time()
        summary = distill(tiny("steps=6", "ray.workers=1"), out / "run", progress=False, evaluate=False)
        result = {"nodes": node_ids(cluster), "gpu_node": gpu_node.node_id,
                  "cluster_resources": ray.cluster_resources(), "summary": summary,
                  "seconds": round(time.time() - began, 1)}
        log(f"one worker: {summary['status']['placement']}")

        began = time.time()
        try:
            distill(tiny("steps=6", "ray.workers=2"), out / "two", progress=False, evaluate=False)
            result["two_workers"] = {"raised": None}
        except ConfigError as exc:
            result["two_workers"] = {"raised": "ConfigError", "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to report
            result["two_workers"] = {"raised": type(exc).__name__, "message": str(exc)}
        result["two_workers"]["seconds"] = round(time.time() - began, 2)
        result["two_workers"]["run_dir_created"] = (out / "two").exists()
        log(f"two workers: {result['two_workers']}")
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


def record_driver_failures() -> list[dict]:
    """Wrap engine.Run.failed (the driver's retry-with-backoff) to see which errors the node loss surfaced."""
    seen: list[dict] = []
    original = engine.Run.failed

    def failed(self, exc):
        seen.append({"time": time.time(), "consecutive": self.failures + 1, "error": type(exc).__name__,
                     "message": str(exc).splitlines()[0][:300] if str(exc) else ""})
        return original(self, exc)

    engine.Run.failed = failed
    return seen


def node_loss(out: Path, steps: int = 40, remove_after: int = 5) -> dict:
    """Remove the node that hosts both workers once `remove_after` steps are done (past the first checkpoint)."""
    run = out / "run"
    failures = record_driver_failures()
    RecordsItsNode.log = str(out / "workers.jsonl")
    ServerRecordsItsNode.log = str(out / "server.jsonl")
    # The parameter server (num_cpus=0) needs no CPU; the head has none, so worker bundles can only go elsewhere.
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(**NODE, num_cpus=2)  # each can hold both 1-CPU worker bundles (PACK)
        connect(cluster)
        nodes = node_ids(cluster)
        outcome: dict = {}

        def distil() -> None:
            try:
                outcome["summary"] = distill(tiny(f"steps={steps}", "ray.workers=2"), run, progress=False,
                                             evaluate=False, hooks=Hooks(worker_cls=RecordsItsNode,
                                                                         server_cls=ServerRecordsItsNode))
            except BaseException:  # noqa: BLE001 - reported through the result file
                outcome["error"] = traceback.format_exc()
            outcome["finished_at"] = time.time()

        began = time.time()
        driver = threading.Thread(target=distil, name="distill", daemon=True)
        driver.start()

        # Wait until both workers are up, the server has written a checkpoint and `remove_after` steps are done
        # (an odd number: a server lost with the node then has steps to redo after its last checkpoint).
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        workers: list[dict] = []
        while time.time() < deadline and driver.is_alive():
            workers = read_lines(out / "workers.jsonl")
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if len(workers) >= 2 and list((run / "checkpoints").glob("ckpt-*.rdck")) and done >= remove_after:
                break
            time.sleep(0.05)
        if not driver.is_alive():
            raise RuntimeError(f"the run ended before a node could be removed: {outcome.get('error')}")
        if len(workers) < 2 or done < remove_after:
            raise RuntimeError(f"within 120 s: {len(workers)} workers up, {done} steps done; wanted 2 and "
                               f"{remove_after}")

        hosts = sorted({w["node_id"] for w in workers})
        assert len(hosts) == 1, f"PACK should put both worker bundles on one node, got {hosts}"
        victim = next(n for n in cluster.worker_nodes if n.node_id == hosts[0])
        servers = read_lines(out / "server.jsonl")
        step_at_removal = len(metrics.read_text().splitlines())
        checkpoints_at_removal = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.rdck"))
        log(f"removing node {victim.node_id} (hosts both workers; the server is on "
            f"{servers[-1]['node_id'] if servers else '?'}) at step {step_at_removal}")
        removed_at = time.time()
        cluster.remove_node(victim)
        log(f"node removed in {time.time() - removed_at:.1f} s")

        driver.join(timeout=180)
        if driver.is_alive():
            raise RuntimeError("the run did not finish within 180 s of the node loss")
        if "error" in outcome:
            raise RuntimeError(f"the run failed after the node loss:\n{outcome['error']}")
        summary = outcome["summary"]
        records = read_lines(metrics)
        slow = max(records, key=lambda r: r.get("seconds", 0))
        log(f"finished {outcome['finished_at'] - removed_at:.1f} s after the removal; placement now "
            f"{summary['status']['placement']}")
        return {
            "nodes": nodes, "steps": steps, "removed_node": victim.node_id, "step_at_removal": step_at_removal,
            "checkpoints_at_removal": checkpoints_at_removal,
            "server_on_removed_node": bool(servers) and servers[-1]["node_id"] == victim.node_id,
            "driver_failures": failures,
            "workers_log": read_lines(out / "workers.jsonl"), "server_log": read_lines(out / "server.jsonl"),
            "summary": summary, "metric_steps": [r["step"] for r in records if "meta_loss" in r],
            "slowest_step": {"step": slow.get("step"), "seconds": slow.get("seconds")},
            "seconds": round(outcome["finished_at"] - began, 1),
            "seconds_after_removal": round(outcome["finished_at"] - removed_at, 1),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def capacity_lost(out: Path, steps: int = 200) -> dict:
    """Remove the only node that can hold workers: the run must stop with a clear error, not wait forever."""
    run = out / "run"
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "num_cpus": 0})
    try:
        cluster.add_node(**NODE, num_cpus=2)
        connect(cluster)
        outcome: dict = {}

        def distil() -> None:
            try:
                distill(tiny(f"steps={steps}", "ray.workers=2", "ray.placement_timeout_s=5"), run,
                               progress=False, evaluate=False)
            except engine.EngineError as exc:
                outcome["engine_error"] = str(exc)
            except BaseException:  # noqa: BLE001 - reported through the result file
                outcome["unexpected"] = traceback.format_exc()
            outcome["finished_at"] = time.time()

        driver = threading.Thread(target=distil, name="distill", daemon=True)
        driver.start()
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and driver.is_alive():
            if list((run / "checkpoints").glob("ckpt-*.rdck")) and metrics.exists():
                break
            time.sleep(0.05)
        removed_at = time.time()
        cluster.remove_node(cluster.worker_nodes[0] if isinstance(cluster.worker_nodes, list)
                            else next(iter(cluster.worker_nodes)))
        driver.join(timeout=120)
        return {"still_running": driver.is_alive(), **outcome,
                "seconds_after_removal": round(outcome.get("finished_at", time.time()) - removed_at, 1),
                "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.rdck"))}
    finally:
        ray.shutdown()
        cluster.shutdown()


def shared_storage(out: Path, steps: int = 40, max_kills: int = 6) -> dict:
    """The parameter server is killed until Ray restarts it on another node; each time it resumes from the checkpoint.

    The run directory is given as a file:// URI to a folder every node sees (on a real cluster, a shared mount): the
    processes have no other state in common, so a restarted server knows where the run stands only from the checkpoint
    in that folder. (Ray places the server, a 0-CPU actor, on any node; soft node affinity does not pin it, so the
    server is killed again, after each new checkpoint, until a restart lands on another node.) An uninterrupted run of
    the same config on the same cluster is the reference the resumed run must match bit for bit.
    """
    import signal

    from raydistill.storage.artifact import read_distilled

    shared = out / "shared"
    uri = f"file://{shared.resolve()}/run"
    run = shared / "run"
    ServerRecordsItsNode.log = str(out / "server.jsonl")
    cfg = lambda: tiny(f"steps={steps}", "ray.workers=2")  # noqa: E731
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(**NODE, num_cpus=2)
        connect(cluster)
        reference = distill(cfg(), f"file://{shared.resolve()}/reference", progress=False, evaluate=False)
        outcome: dict = {}

        def distil() -> None:
            try:
                outcome["summary"] = distill(cfg(), uri, progress=False, evaluate=False,
                                             hooks=Hooks(server_cls=ServerRecordsItsNode))
            except BaseException:  # noqa: BLE001 - reported through the result file
                outcome["error"] = traceback.format_exc()

        driver = threading.Thread(target=distil, name="distill", daemon=True)
        driver.start()
        metrics, checkpoints = run / "metrics.jsonl", run / "checkpoints"

        def newest_checkpoint() -> int:
            names = sorted(p.name for p in checkpoints.glob("ckpt-*.rdck"))
            return int(names[-1].split("-")[1].split(".")[0]) if names else -1

        kills: list[dict] = []
        deadline = time.time() + 150
        while len(kills) < max_kills and driver.is_alive() and time.time() < deadline:
            servers = read_lines(out / "server.jsonl")
            if len(servers) > 1 and servers[-1]["node_id"] != servers[0]["node_id"]:
                break  # restarted on another node
            # Kill once the current server has checkpointed at least once past where it started, mid-interval.
            started_at = servers[-1]["restored_step"] or 0 if servers else None
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if len(servers) == len(kills) + 1 and newest_checkpoint() > started_at and done % 2 == 1:
                kills.append({"pid": servers[-1]["pid"], "node_id": servers[-1]["node_id"], "step": done,
                              "newest_checkpoint": newest_checkpoint()})
                log(f"killing the server (pid {servers[-1]['pid']}) at step {done}")
                os.kill(servers[-1]["pid"], signal.SIGKILL)
            time.sleep(0.02)
        driver.join(timeout=180)
        if driver.is_alive():
            raise RuntimeError("the run did not finish within 180 s")
        if "error" in outcome:
            raise RuntimeError(f"the run failed:\n{outcome['error']}")
        same = bool((read_distilled(uri).images == read_distilled(reference["run_dir"]).images).all())
        return {"nodes": node_ids(cluster), "steps": steps, "uri": uri, "kills": kills,
                "server_log": read_lines(out / "server.jsonl"), "summary": outcome["summary"],
                "reference_status": reference["status"],
                "metric_steps": [r["step"] for r in read_lines(metrics) if "meta_loss" in r],
                "same_artifact_as_reference": same}
    finally:
        ray.shutdown()
        cluster.shutdown()


SCENARIOS = {"gpu-placement": gpu_placement, "node-loss": node_loss, "capacity-lost": capacity_lost,
             "shared-storage": shared_storage}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SCENARIOS:
        print(f"usage: {Path(__file__).name} {{{','.join(SCENARIOS)}}} OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    try:
        result = SCENARIOS[argv[0]](out)
        code = 0
    except BaseException:  # noqa: BLE001 - the test reads the traceback from the result file
        result, code = {"error": traceback.format_exc()}, 1
    result["scenario"], result["total_seconds"] = argv[0], round(time.time() - began, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    log(f"{argv[0]}: {'ok' if code == 0 else 'error'} in {result['total_seconds']} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
