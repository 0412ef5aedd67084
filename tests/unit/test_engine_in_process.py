"""The engine without Ray: an in-process run asks Ray nothing, how many workers a node holds, and a server that goes
back a step (restarted inside a call, or after its checkpoint) logs every step once."""

import json

import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import ENGINE_STEPS as STEPS, engine_config as tiny, images_of, metric_steps, needs_fashion
from raydistill.engine.driver import Hooks, distill
from raydistill.engine.server import ParameterServer

pytestmark = needs_fashion


def test_an_in_process_run_validates_and_batches_samples_without_ray(tmp_path, monkeypatch):
    """--in-process never asks Ray anything, validation included (it once asked Ray for the spare GPU share: a
    session's Ray hides that, hence the patch); with ratbptt.samples_per_task each step logs every sample's start."""
    def no_ray(*args, **kwargs):
        raise AssertionError("an in-process run called Ray")

    monkeypatch.setattr(ray, "cluster_resources", no_ray)
    monkeypatch.setattr(ray, "get", no_ray)
    summary = distill(tiny("eval.every=3", "eval.val_models=1", "eval.val_steps=5", "ratbptt.samples_per_task=2"),
                      tmp_path / "run", in_process=True, progress=False, evaluate=False)
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_acc" in r] == [3, 6]
    assert all(len(r["stats"][0]["starts"]) == 2 for r in lines if "meta_loss" in r)


def test_a_node_holds_as_many_workers_as_every_resource_allows():
    from raydistill.engine.cluster import workers_that_fit

    assert workers_that_fit({"CPU": 1.0, "GPU": 2.0}, {"GPU": 1.0, "CPU": 1.0}) == 1
    assert workers_that_fit({"CPU": 8.0, "GPU": 2.0}, {"GPU": 0.5, "CPU": 1.0}) == 4
    assert workers_that_fit({"CPU": 2.0}, {"GPU": 1.0, "CPU": 1.0}) == 0


class GoesBackSilently(ParameterServer):
    """At step 5 the server "restarts" inside a call and answers from its newest checkpoint (step 4), as a server Ray
    restarted and retried the call on does: the driver sees no error, only a step that went back."""

    def __init__(self, *args):
        super().__init__(*args)
        self.args, self.went_back = args, False

    def snapshot(self) -> dict:
        if self.step == 5 and not self.went_back:
            args = self.args
            ParameterServer.__init__(self, *args)  # a fresh server on the same run directory: it restores step 4
            self.args, self.went_back = args, True
            assert self.step == 4
        return super().snapshot()


class DiesAfterItsCheckpoint(ParameterServer):
    """Step 3 brings the run to step 4 and writes its checkpoint; then the server dies before its answer reaches the
    driver, and Ray's retry of the call reaches the restarted server, which resumed from that very checkpoint and
    turns the repeated step away. The driver never saw step 4's report."""

    def __init__(self, *args):
        super().__init__(*args)
        self.args, self.died = args, False

    def apply_sync(self, step, *results):
        report = super().apply_sync(step, *results)
        if step == 3 and not self.died:
            assert report["accepted"] and report["step"] == 4
            args = self.args
            ParameterServer.__init__(self, *args)  # the restarted server: it restores step 4
            self.args, self.died = args, True
            return super().apply_sync(step, *results)  # the retried call, turned away
        return report


@needs_fashion
def test_a_step_checkpointed_before_its_report_was_lost_is_still_logged(tmp_path):
    distill(tiny(), tmp_path / "run", in_process=True, progress=False, evaluate=False,
            hooks=Hooks(server_cls=DiesAfterItsCheckpoint))
    distill(tiny(), tmp_path / "straight", in_process=True, progress=False, evaluate=False)
    assert metric_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("recovered")] == [4]  # written from the checkpoint
    for ours, theirs in zip(lines, straight):  # the recovered line says what the lost report said
        assert ours["meta_loss"] == theirs["meta_loss"] and ours["grad_norm"] == theirs["grad_norm"]
    assert torch.equal(images_of(tmp_path / "run"), images_of(tmp_path / "straight"))
    curves = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    curves.Reload()
    assert [e.step for e in curves.Scalars("distill/meta_loss")] == list(range(1, STEPS + 1))  # TensorBoard too


@needs_fashion
def test_steps_redone_after_a_silent_server_restart_are_logged_once(tmp_path):
    distill(tiny(), tmp_path / "run", in_process=True, progress=False, evaluate=False,
            hooks=Hooks(server_cls=GoesBackSilently))
    distill(tiny(), tmp_path / "straight", in_process=True, progress=False, evaluate=False)
    assert metric_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    assert torch.equal(images_of(tmp_path / "run"), images_of(tmp_path / "straight"))
