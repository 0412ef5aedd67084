"""Multi-node behaviour on a simulated cluster (ray.cluster_utils.Cluster): GPU placement and the loss of a node.

Each scenario runs in its own process (tests/helpers/cluster_scenarios.py), because this session may already hold a
Ray instance of its own; the script writes what it saw to result.json and the tests assert on that.
"""

from helpers import needs_fashion, run_scenario

pytestmark = needs_fashion


def test_workers_land_on_the_gpu_node_and_an_impossible_gpu_request_fails_at_once(tmp_path):
    result = run_scenario("gpu-placement", tmp_path)
    nodes, gpu_node = result["nodes"], result["gpu_node"]
    assert gpu_node in nodes["others"] and gpu_node != nodes["head"]
    assert result["cluster_resources"]["GPU"] == 1

    status = result["summary"]["status"]
    (placed,) = status["placement"]
    # The head has two idle CPUs, enough for a CPU worker: only the GPU bundle puts the worker on the GPU node.
    assert placed["node_id"] == gpu_node
    assert placed["gpu_ids"] == ["0"]  # Ray assigned it the logical GPU...
    assert placed["device"] == "cpu"  # ...which has no CUDA behind it: the worker fell back to the CPU
    assert status["applied_steps"] == list(range(6)) and status["step"] == 6

    two = result["two_workers"]  # two workers of one GPU each on a one-GPU cluster
    assert two["raised"] == "ConfigError", two
    assert "2 workers need 2 GPU but the cluster has 1" in two["message"]
    assert "ray.gpus_per_worker" in two["message"]
    assert two["seconds"] < 30  # at once, not after ray.placement_timeout_s
    assert not two["run_dir_created"]


def test_losing_the_node_that_hosts_the_workers_loses_no_step(tmp_path):
    result = run_scenario("node-loss", tmp_path)
    nodes, removed, steps = result["nodes"], result["removed_node"], result["steps"]
    assert removed in nodes["others"]
    (survivor,) = [n for n in nodes["others"] if n != removed]

    # The node was removed mid-run, after a checkpoint, with both workers on it (PACK).
    assert result["checkpoints_at_removal"] and 0 < result["step_at_removal"] < steps
    first_two = result["workers_log"][:2]
    assert {w["node_id"] for w in first_two} == {removed}

    status = result["summary"]["status"]
    assert status["applied_steps"] == list(range(steps)) and status["step"] == steps
    assert result["metric_steps"] == list(range(1, steps + 1))  # redone steps are logged once

    # Both workers restarted (new processes) in their rescheduled bundles on the other worker node; the head has no
    # CPU for them.
    restarted = result["workers_log"][2:]
    assert len(restarted) >= 2 and {w["node_id"] for w in restarted} == {survivor}
    assert not {w["pid"] for w in restarted} & {w["pid"] for w in first_two}
    assert [p["node_id"] for p in status["placement"]] == [survivor, survivor]

    # The parameter server (num_cpus=0) lands on any node; when it was on the removed one it resumed from the last
    # checkpoint before the loss on a surviving node, otherwise it never restarted.
    servers = result["server_log"]
    if result["server_on_removed_node"]:
        assert servers[0]["node_id"] == removed and servers[-1]["node_id"] != removed
        last_checkpoint = int(result["checkpoints_at_removal"][-1].split("-")[1].split(".")[0])
        restored = status["restored_step"]
        assert restored == servers[-1]["restored_step"] and restored % 2 == 0  # ray.checkpoint_every=2
        assert last_checkpoint <= restored < steps  # (the server may checkpoint once more before the node is gone)
    else:
        assert len(servers) == 1 and status["restored_step"] is None
    assert len(result["driver_failures"]) < 10  # a handful of retries, far from the engine's limit of 50


def test_losing_every_node_that_can_hold_workers_stops_with_a_clear_error(tmp_path):
    result = run_scenario("capacity-lost", tmp_path)
    assert not result["still_running"] and "unexpected" not in result, result
    assert "could not be placed again within ray.placement_timeout_s=5 s" in result["engine_error"]
    assert "raydistill distill --resume" in result["engine_error"]
    assert result["seconds_after_removal"] < 60
    assert result["checkpoints"]  # what was done is kept for --resume
