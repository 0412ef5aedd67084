"""End to end on a real (local) Ray cluster: `ray start --head`, a second node, `ray job submit` of a distillation
that reads a prepared Parquet set, then the job's status and the artifact it wrote.

The stand-in data are a small JPEG folder made from Fashion-MNIST (scripts/make_fmnist_folder.py), prepared with
`raydistill prepare` on the cluster itself. Everything binds to 127.0.0.1, in a temp dir and on ports of its own, so
it never meets the session's Ray (tests/conftest.py) or anyone else's. It is stopped by process tree, not with
`ray stop`: `ray stop` kills every Ray process on the machine, whoever started it.

`ray start` cannot add a second node on loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps the head on
127.0.0.1) it refuses to start a non-head node, and with =1 it rewrites 127.0.0.1 to the machine's network address.
The second node is therefore started the way ray.cluster_utils starts one (Ray's Node class with head=False, from
raydistill.compat.ray_node_classes), in a process of its own. The job API lives in the dashboard, so this test needs Ray's dashboard dependencies
(`ray[default]`, in the test extra); it fails with that hint where they are missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import FASHION, REPO, needs_fashion
from raydistill.compat import dashboard_dependency_error

pytestmark = [pytest.mark.slow, needs_fashion]

MAKE_FOLDER = REPO / "scripts" / "make_fmnist_folder.py"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
RAYDISTILL = [sys.executable, "-m", "raydistill.cli"]
JOB_TIMEOUT_S = 240

# The second node: a raylet (and its agents) on 127.0.0.1 joined to the head's GCS, alive until this process is
# killed. Started like ray.cluster_utils.Cluster.add_node does it.
NODE_SCRIPT = r"""
import sys, time
from raydistill.compat import ray_node_classes

Node, RayParams = ray_node_classes()

params = RayParams(node_ip_address="127.0.0.1", gcs_address=sys.argv[1], num_cpus=1, num_gpus=0,
                   object_store_memory=80 * 2**20, include_log_monitor=False, node_manager_port=0,
                   min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=None)
Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
print("node started", flush=True)
while True:
    time.sleep(3600)
"""


def dashboard_missing() -> str | None:
    return dashboard_dependency_error()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- process bookkeeping


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can see (from /proc; no psutil needed)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def descendants(roots: list[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, frontier = set(), list(roots)
    while frontier:
        pid = frontier.pop()
        children = [c for c, (parent, _) in table.items() if parent == pid and c not in found]
        found.update(children)
        frontier += children
    return found


class LocalCluster:
    """A head (`ray start --head --block`) and a second node, on 127.0.0.1, in a temp dir of their own."""

    def __init__(self, env: dict):
        self.temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths must stay < 108
        self.env = env
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = Path(self.temp_dir) / f"{name}.log"
        self.logs.append(log)
        with open(log, "w") as out:  # start_new_session: a process group of our own, killed as a whole in stop()
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=self.temp_dir)
        self.procs.append(proc)
        return proc

    def start(self, head_cpus: int = 1, timeout_s: float = 60) -> None:
        head = [*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                f"--num-cpus={head_cpus}", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}", f"--object-store-memory={100 * 2**20}", "--disable-usage-stats"]
        proc = self._spawn("head", head, self.env)
        self._wait(lambda: self._get("/api/version") is not None, proc, timeout_s, "the head's dashboard")
        node = self._spawn("node2", [sys.executable, "-c", NODE_SCRIPT, self.gcs], self.env)
        self._wait(lambda: len(self.alive_nodes()) == 2, node, timeout_s, "the second node")

    def _wait(self, ready, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited with {proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not up after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the dashboard's state API."""
        reply = self._get("/api/v0/nodes?limit=100")
        nodes = (reply or {}).get("data", {}).get("result", {}).get("result", [])
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def actors(self) -> list[dict]:
        reply = self._get("/api/v0/actors?limit=1000&detail=1")
        return (reply or {}).get("data", {}).get("result", {}).get("result", [])

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs if log.exists())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """Kill every process this cluster started: each spawned process group, everything descended from the
        spawned processes (a job's driver runs in a session of its own), and anything still naming the temp dir."""
        table = process_table()
        ours = {p.pid for p in self.procs} | descendants([p.pid for p in self.procs], table)
        ours |= {pid for pid, (_, cmd) in table.items() if self.temp_dir in cmd}
        ours.discard(os.getpid())
        groups = {p.pid for p in self.procs}  # each is its own process group leader (start_new_session)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in ours:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (5 if sig == signal.SIGTERM else 10)
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid)
                                                      for pid in ours):
                time.sleep(0.2)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if not self.still_running():
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's logs; a failing assertion has quoted them

    def still_running(self) -> list[str]:
        table = process_table()
        return [cmd[:120] for pid, (_, cmd) in table.items() if self.temp_dir in cmd and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture
def cluster_env(tmp_path):
    missing = dashboard_missing()
    if missing:
        # The test extra installs ray[default]: a missing dashboard is a broken environment, not a reason to skip.
        pytest.fail(f"ray job submit needs Ray's dashboard ({missing}); install it with pip install -e '.[test]'")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # nothing here may join another cluster
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # the head binds to 127.0.0.1 as told
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return env


def test_ray_job_submit_distills_a_prepared_parquet_set(tmp_path, cluster_env):
    began = time.monotonic()
    phase = lambda what: print(f"[{time.monotonic() - began:6.1f} s] {what}", flush=True)  # noqa: E731
    folder, prepared, run_dir = tmp_path / "folder", tmp_path / "prepared", tmp_path / "run"
    made = subprocess.run([sys.executable, str(MAKE_FOLDER), "--out", str(folder), "--source", FASHION,
                           "--per-class", "20", "--val-per-class", "5", "--size", "32", "--jobs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert json.loads((folder / "stand-in.json").read_text())["counts"] == {"train": 200, "val": 50}

    phase("stand-in folder written")
    cluster = LocalCluster(cluster_env)
    try:
        cluster.start(head_cpus=1)
        phase("head and second node up")
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2 and {n["node_ip"] for n in nodes} == {"127.0.0.1"}

        # prepare runs on the cluster (its Ray Data tasks go wherever Ray places them), as a driver joining it
        prep = subprocess.run([*RAYDISTILL, "prepare", str(folder), "--out", str(prepared), "--image-size", "32",
                               "--address", cluster.gcs, "--quiet"], env=cluster_env, capture_output=True,
                              text=True, timeout=180)
        assert prep.returncode == 0, prep.stdout + prep.stderr
        manifest = json.loads((prepared / "manifest.json").read_text())
        assert manifest["image_shape"] == [3, 32, 32] and manifest["splits"]["train"]["count"] == 200

        phase("prepared on the cluster")
        config = tmp_path / "tiny.yaml"
        config.write_text(
            "ipc: 1\nsteps: 4\nthreads: 1\n"
            f"data: {{name: parquet, root: {prepared}, image_size: 32, val_size: 20}}\n"
            "model: {name: convnet, width: 8, depth: 2, norm: instance}\n"
            "ratbptt: {unroll: 4, window: 2, real_batch: 32}\n"
            "eval: {num_models: 1, steps: 5, every: 0}\n"
            # two 1-CPU workers on a 1-CPU head and a 1-CPU node: one worker lands on each node
            "ray: {workers: 2, cpus_per_worker: 1, worker_threads: 1, checkpoint_every: 2, placement_timeout_s: 60}\n")
        submission = f"raydistill-e2e-{os.getpid()}-{int(time.time())}"
        submitted = cluster.ray("job", "submit", "--address", cluster.url, "--submission-id", submission,
                                "--no-wait", "--", *RAYDISTILL, "distill", "--preset", str(config),
                                "--out", str(run_dir), "--quiet")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr

        phase(f"submitted {submission}")
        status = poll_job(cluster, submission, JOB_TIMEOUT_S)
        phase(f"job ended {status}")
        logs = cluster.ray("job", "logs", "--address", cluster.url, submission).stdout
        assert status == "SUCCEEDED", f"job {submission} ended {status}:\n{logs[-4000:]}\n{cluster.log_tail()}"
        reported = cluster.ray("job", "status", "--address", cluster.url, submission)
        said = re.sub(r"\x1b\[[0-9;]*m", "", reported.stdout + reported.stderr)  # the CLI colours its output
        assert reported.returncode == 0 and f"Job '{submission}' succeeded" in said, said
        assert f"run directory: {run_dir}" in logs

        # both meta-gradient workers ran, one on each node, on this job's cluster
        workers = [a for a in cluster.actors() if a.get("class_name", "").endswith("GradientWorker")]
        assert {a["node_id"] for a in workers} == {n["node_id"] for n in nodes}, workers
    finally:
        cluster.stop()
        phase("cluster stopped")
    assert cluster.still_running() == [], "processes of the test cluster survived stop()"

    check_artifact(run_dir, prepared)
    assert time.monotonic() - began < 300


def poll_job(cluster: LocalCluster, submission: str, timeout_s: float) -> str:
    """The job's final status (SUCCEEDED / FAILED / STOPPED), read with the Job SDK every 2 s; AssertionError on
    timeout (the job is stopped first)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(submission)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(2)
    client.stop_job(submission)
    raise AssertionError(f"job {submission} still {status} after {timeout_s} s:\n"
                         f"{client.get_job_logs(submission)[-4000:]}")


def check_artifact(run_dir: Path, prepared: Path) -> None:
    """The run directory's distilled set opens with raydistill's reader and is the set the config asked for."""
    import torch

    from raydistill.storage.artifact import read_distilled

    dset = read_distilled(run_dir / "distilled.parquet")
    assert tuple(dset.images.shape) == (10, 3, 32, 32)
    assert sorted(dset.labels.tolist()) == list(range(10))
    assert torch.isfinite(dset.images).all() and dset.images.std() > 0
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert dset.metadata["class_names"] == manifest["classes"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 4 for r in steps), steps[-3:]
    assert json.loads((run_dir / "eval.json").read_text())["results"]["convnet"]["mean"] >= 0
