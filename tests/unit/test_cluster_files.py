"""The cluster launch files (cluster/): valid for Ray's launcher, pinned to this version, free of credentials.

Offline and fast: Ray's own `prepare_config` + `validate_config` (the schema and the checks `ray up` runs before it
contacts a cloud), YAML structure for the KubeRay job, and the `ray submit` entry script's argument handling.
"""

import copy
import importlib.util
import os
import re
import socket
import subprocess
import sys
import tomllib

import pytest
import yaml

from helpers import REPO
from raydistill.compat import prepare_cluster_config, validate_cluster_config

ROOT = REPO
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
KUBERAY = CLUSTER / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
ALL_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WHEEL = f"raydistill-{VERSION}-py3-none-any.whl"
# The torch / torchvision builds the project is tested with (the Makefile's `setup`); the cluster installs the same.
TORCH_PINS = re.findall(r"\b(torch(?:vision)?==[\w.+]+)", (ROOT / "Makefile").read_text())


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: validation must stay offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_files_pass_rays_own_validator(name, no_network):
    # prepare_config merges the provider's defaults.yaml (a file inside ray; the cloud SDKs are not imported and
    # no cloud is called: that is bootstrap_config's job, which `ray up` runs later), then validate_config checks
    # the result against ray-schema.json and Ray's cross-field rules.
    prepared = prepare_cluster_config(copy.deepcopy(launcher(name)))
    validate_cluster_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_files_have_a_head_and_autoscaling_gpu_workers(name):
    cfg = launcher(name)
    types = cfg["available_node_types"]
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["max_workers"] > gpu["min_workers"] >= 1  # room to scale, and GPUs alive when a run starts
    node = yaml.safe_dump(gpu["node_config"])
    assert re.search(r"InstanceType: g\d|acceleratorType: nvidia-", node), "the worker type has no GPU"
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no meta-gradient worker on the head
    assert set(cfg["auth"]) == {"ssh_user"}


def test_onprem_file_uses_placeholder_documentation_addresses():
    provider = launcher("onprem.yaml")["provider"]
    assert provider["type"] == "local"
    for ip in [provider["head_ip"], *provider["worker_ips"]]:
        assert ip.startswith("192.0.2."), f"{ip} is not a TEST-NET-1 placeholder"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_every_node_installs_the_pinned_wheel_and_checks_its_version(name):
    cfg = launcher(name)
    assert any(remote.endswith(WHEEL) and local == f"dist/{WHEEL}" for remote, local in cfg["file_mounts"].items())
    setup = " ".join(cfg["setup_commands"])  # setup_commands run on the head and on every worker
    assert WHEEL in setup
    assert f"== '{VERSION}'" in setup, "no check of the installed raydistill version"
    for pin in TORCH_PINS:
        assert pin in setup


def test_every_file_names_pyprojects_version_and_no_other():
    found = {}
    for path in ALL_FILES:
        text = path.read_text()
        found[path.name] = set(re.findall(r"raydistill-(\d[\w.]*)-py3-none-any\.whl", text))
        found[path.name] |= set(re.findall(r"raydistill:(\d[\w.]*)", text))
        found[path.name] |= set(re.findall(r"== ?'(\d[\w.]*)'", text))  # the installed-version checks
    for name in [*LAUNCHER_FILES, KUBERAY.name, DOCKERFILE.name]:
        assert found[name] == {VERSION}, f"{name} pins raydistill {found[name]}, pyproject.toml says {VERSION}"
    assert all(v == {VERSION} for v in found.values() if v), found


def test_every_file_runs_one_ray_version():
    versions = {}
    for path in ALL_FILES:
        text = path.read_text()
        versions[path.name] = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        versions[path.name] |= set(re.findall(r"ray\[default\]==(\d+\.\d+\.\d+)", text))
        versions[path.name] |= set(re.findall(r"rayVersion: \"(\d+\.\d+\.\d+)\"", text))
    pinned = set().union(*versions.values())
    assert len(pinned) == 1, f"the cluster files name different Ray versions: {versions}"
    (ray_version,) = pinned
    minimum = re.search(r'"ray\[[\w,]+\]>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(ray_version) >= as_tuple(minimum)


def test_kuberay_job_runs_raydistill_on_a_gpu_cluster_and_shuts_it_down():
    job, *rest = kuberay_docs()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raydistill ")
    assert "--in-process" not in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        worker = group["template"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert worker["image"] == head["image"]
    assert head["image"].endswith(f"/raydistill:{VERSION}")
    # The run directory (--out) lives on a claim that outlives the job's cluster.
    out = re.search(r"--out (\S+)", spec["entrypoint"]).group(1)
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert any(out.startswith(m + "/") for m in mounts)
    claims = {d["metadata"]["name"] for d in rest if d["kind"] == "PersistentVolumeClaim"}
    assert "raydistill-runs" in claims


def test_the_image_installs_the_pinned_wheel():
    text = DOCKERFILE.read_text()
    assert f"COPY dist/{WHEEL} " in text and f"/tmp/{WHEEL}" in text
    for pin in TORCH_PINS:
        assert pin in text


SECRETS = re.compile(
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|secret_?key|BEGIN [A-Z ]*PRIVATE KEY|"
    r"ssh_private_key|api_key|apikey|access_token|bearer\s+\S|password|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN\s*[=:]",
    re.IGNORECASE)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_file_holds_a_credential(path):
    hits = [line.strip() for line in path.read_text().splitlines() if SECRETS.search(line)]
    assert not hits, f"{path.name} looks like it holds a credential: {hits}"


def test_the_secret_pattern_catches_the_usual_suspects():
    for line in ["aws_access_key_id: AKIAABCDEFGHIJKLMNOP", "-----BEGIN OPENSSH PRIVATE KEY-----",
                 "ssh_private_key: ~/.ssh/id_rsa", "WANDB_API_KEY: abc", "RAY_AUTH_TOKEN=abc"]:
        assert SECRETS.search(line), line


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_the_dashboard_is_not_exposed_and_every_node_requires_the_token(name):
    cfg = launcher(name)
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    assert not any("dashboard-host" in c for c in head), "the dashboard must stay on loopback (ray dashboard)"
    for commands in (head, workers):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# --- the `ray submit` entry script ---------------------------------------------------------------------------

def _load_entry():
    spec = importlib.util.spec_from_file_location("submit_entry", CLUSTER / "submit_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def entry(monkeypatch):
    """The entry script, with raydistill.cli.main replaced by a recorder that returns 7."""
    import raydistill.cli

    calls = []
    monkeypatch.setattr(raydistill.cli, "main", lambda argv=None: calls.append(argv) or 7)
    monkeypatch.setenv("RAY_ADDRESS", "")  # recorded, so whatever the script sets is undone afterwards
    monkeypatch.delenv("RAY_ADDRESS")
    module = _load_entry()
    module.calls = calls
    return module


@pytest.mark.parametrize("command", ["distill", "boost"])
def test_entry_adds_address_auto_when_none_is_given(entry, command):
    args = [command, "--preset", "quickstart", "--set", "data.root=/data/x", "--workers", "2"]
    assert entry.main(["--", *args]) == 7  # the CLI's own exit code
    assert entry.calls == [args + ["--address", "auto"]]


def test_entry_passes_arguments_through_unchanged_and_tune_joins_too(entry):
    entry.main(["tune", "tune_configs/fmnist-window-unroll.yaml", "--quiet"])
    assert entry.calls == [["tune", "tune_configs/fmnist-window-unroll.yaml", "--quiet", "--address", "auto"]]


@pytest.mark.parametrize("address", [["--address", "ray://10.0.0.1:10001"], ["--address=auto"]])
def test_entry_keeps_an_explicit_address(entry, address):
    args = ["distill", *address, "--workers", "4"]
    entry.main(args)
    assert entry.calls == [args]


def test_entry_leaves_commands_without_a_cluster_alone(entry):
    for args in (["show", "/home/ray/runs/x"], ["presets"], ["eval", "/home/ray/runs/x", "--models", "2"]):
        entry.main(args)
    assert entry.calls == [["show", "/home/ray/runs/x"], ["presets"], ["eval", "/home/ray/runs/x", "--models", "2"]]


def test_entry_joins_a_resumed_run_through_ray_address(entry):
    entry.main(["distill", "--resume", "/home/ray/runs/x"])
    assert entry.calls == [["distill", "--resume", "/home/ray/runs/x"]]  # the CLI refuses --address with --resume
    assert os.environ["RAY_ADDRESS"] == "auto"


def test_entry_refuses_in_process_in_one_line(entry, capsys):
    assert entry.main(["--", "distill", "--preset", "quickstart", "--in-process"]) == 2
    assert entry.calls == []
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--in-process" in err


def test_entry_on_a_node_without_raydistill_is_one_line():
    """A node whose Python lacks raydistill (a cluster set up by hand): one line naming the fix, exit 2."""

    # -I: isolated mode (no site-packages of this venv's editable install on the path, no PYTHONPATH); -S: no site.
    done = subprocess.run([sys.executable, "-I", "-S", str(CLUSTER / "submit_entry.py"), "--", "distill", "--preset",
                           "quickstart"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "raydistill is not installed on this node" in lines[0], done.stderr
