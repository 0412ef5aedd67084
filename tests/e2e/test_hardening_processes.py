"""Hardening that needs processes of its own: Ctrl-C on a `raydistill distill` process prints the resume command,
and the Ray that `raydistill distill` starts for itself is closed to the network."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import STORAGE_TINY as TINY, needs_fashion


def default_sigint() -> None:
    """In the child before exec: SIGINT unblocked and at its default, as in a terminal. A child inherits a blocked
    or ignored SIGINT from its parent, and Python then never raises KeyboardInterrupt; in the full suite the child
    once ran to its end through the signal (exit 0, nothing on stderr) although alone it passed."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_fashion
def test_ctrl_c_prints_the_resume_command(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "distill", "--in-process", "--quiet", "--no-eval",
                             "--out", str(run), "--set=steps=400", *(f"--set={s}" for s in TINY[1:])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    started = (run / "metrics.jsonl").exists()
    lines = len((run / "metrics.jsonl").read_text().splitlines()) if started else 0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    parent = f"the parent's SIGINT: {signal.getsignal(signal.SIGINT)}, blocked {blocked}"
    assert started, f"no metrics.jsonl within 120 s (exit {proc.returncode}): {err[-2000:]}"
    assert proc.returncode == 130, f"exit {proc.returncode} at metrics line {lines}, {parent}: {err[-2000:]}"
    assert err.strip().splitlines()[-1] == f"raydistill: run interrupted; continue it with: raydistill distill --resume {run}"


@pytest.mark.slow
def test_the_embedded_ray_listens_on_loopback_only_with_authentication_on(tmp_path):
    """The Ray `raydistill distill` starts for itself: every node address is 127.0.0.1, and Ray's token
    authentication is left at its default (on) — the environment here does not switch it off."""
    script = (
        "import json, ray\n"
        "from raydistill.runtime import connect\n"
        "connect(None)\n"
        "print(json.dumps({'node': ray.nodes()[0]['NodeManagerAddress'],\n"
        "                  'gcs': ray.get_runtime_context().gcs_address,\n"
        "                  'task': ray.get(ray.remote(lambda: 1).remote())}))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                                           "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "HOME": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["node"] == "127.0.0.1" and found["gcs"].startswith("127.0.0.1:") and found["task"] == 1
