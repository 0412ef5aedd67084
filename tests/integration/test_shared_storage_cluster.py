"""Runs on shared storage across nodes: on a simulated two-node cluster (helpers/cluster_scenarios.py), a parameter
server that Ray restarts on another node resumes from the checkpoint in the shared folder a file:// URI names."""

import pytest

from helpers import needs_fashion, run_scenario


@needs_fashion
@pytest.mark.slow
def test_a_server_restarted_on_another_node_resumes_from_the_shared_folder(tmp_path):
    result = run_scenario("shared-storage", tmp_path)
    steps, servers, kills, status = result["steps"], result["server_log"], result["kills"], result["summary"]["status"]
    assert kills and len(servers) == len(kills) + 1  # one restart per kill
    assert servers[-1]["node_id"] != servers[0]["node_id"] and servers[-1]["pid"] != servers[0]["pid"]
    # Every server opened the run from the shared folder the file:// URI names, and each restarted one resumed from
    # the checkpoint it found there: at or after the newest one written before its predecessor was killed.
    shared = result["uri"][len("file://"):]
    assert {s["checkpoints"] for s in servers} == {f"{shared}/checkpoints"}
    assert servers[0]["restored_step"] is None
    for kill, restarted in zip(kills, servers[1:]):
        assert kill["newest_checkpoint"] <= restarted["restored_step"] < steps
    assert status["restored_step"] == servers[-1]["restored_step"]
    # No step lost or applied twice, every step logged once, and the set is the uninterrupted run's, bit for bit.
    assert status["applied_steps"] == list(range(steps)) == result["reference_status"]["applied_steps"]
    assert result["metric_steps"] == list(range(1, steps + 1))
    assert result["same_artifact_as_reference"]
