"""Evaluation on Ray: the report from Ray tasks equals the in-process one, and the validator actor scores a snapshot
as the in-process validator does. The `fashion` and `one_thread` fixtures are conftest.py's."""

import torch

from helpers import eval_config as tiny, expected_validation, needs_fashion, snapshot_of, stand_in_set as distilled
from raydistill.engine.worker import ValidatorActor, validator_options
from raydistill.evaluate.remote import evaluation_report_on_ray
from raydistill.evaluate.report import ReportOptions, evaluation_report, network_count

CPU = torch.device("cpu")


@needs_fashion
def test_the_ray_report_equals_the_in_process_report(ray_session, fashion, one_thread):
    cfg = tiny("eval.baselines=[random,kcenter]")
    x, y = distilled(fashion)
    ticks = []
    on_ray = evaluation_report_on_ray(x, y, 1, fashion, cfg, ReportOptions(tick=lambda: ticks.append(1)))
    assert on_ray == evaluation_report(x, y, 1, fashion, cfg, ReportOptions(device=CPU))
    assert len(ticks) == network_count(cfg, cfg.eval.archs, 2)


@needs_fashion
def test_the_validator_actor_returns_validation_accuracy(ray_session, fashion, one_thread):
    cfg = tiny()
    snapshot = snapshot_of(fashion, soft=True)
    actor = ray_session.remote(ValidatorActor).options(**validator_options(has_gpus=False)).remote(cfg)
    first = ray_session.get(actor.validate.remote(snapshot))
    assert first == expected_validation(snapshot, fashion, cfg)
    assert ray_session.get(actor.validate.remote(ray_session.put(snapshot))) == first  # as the driver passes it
    ray_session.kill(actor)
