"""The sweep's search space in Tune's own terms, the searcher that walks it, and its corners.

Tune draws every sample: `grid` becomes tune.grid_search, `choice` tune.choice, `uniform` tune.uniform, `loguniform`
tune.loguniform and `randint` tune.randint (high exclusive). The `basic` searcher is Tune's BasicVariantGenerator:
every grid point times `num_samples` draws of the random dimensions, seeded by the sweep's `seed`. The `optuna`
searcher is Tune's OptunaSearch (TPE, seeded): `num_samples` trials in all, each proposed from the scores of the
finished ones. Nothing is drawn up front, so the sweep checks the corners of the space instead (see `corners`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher

from raydistill.config import ConfigError, DistillConfig
from raydistill.tune.sweep import Sweep, trial_config

MAX_CORNERS = 256  # samples tried by `corners`; a bigger product is cut (its largest values come first)


def search_space(sweep: Sweep) -> dict[str, Any]:
    """Tune's param_space: one Tune domain per searched key (the keys stay dotted, as in the sweep file)."""
    return {key: _domain(kind, args) for key, (kind, args) in sweep.search.items()}


def _domain(kind: str, args: list) -> Any:
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(*args)


def make_searcher(sweep: Sweep) -> SearchAlgorithm | Searcher:
    """The sweep's search algorithm, seeded with `seed` and limited to `max_concurrent_trials` running trials."""
    limit = sweep.max_concurrent_trials
    if sweep.searcher == "basic":
        return BasicVariantGenerator(max_concurrent=limit or 0, random_state=sweep.seed)
    from ray.tune.search.optuna import OptunaSearch  # optuna is an optional extra

    searcher = FinalScoreSearcher(OptunaSearch(metric=sweep.metric, mode="max", seed=sweep.seed))
    return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


class FinalScoreSearcher(Searcher):
    """Passes a model-based searcher each trial's final score only, never its intermediate reports.

    Early stopping is ASHA's job (Tune runs OptunaSearch with Optuna's pruner off), so the intermediate reports carry
    nothing the model uses. Hiding them, and the metric from Tune's per-report check, lets a boosting sweep rank on
    val_acc_mean or val_acc@K, which exist only at a trial's end.
    """

    def __init__(self, searcher: Searcher):
        super().__init__()  # no metric of its own: Tune then does not demand it in every report
        self.searcher = searcher

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune saves a wrapper's own state beside its inner searcher's (which it saves itself): this one has none.
    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


def planned_trials(sweep: Sweep) -> int:
    """How many trials the sweep runs in all: grid points x num_samples (basic), or num_samples (optuna)."""
    grid = [len(args) for kind, args in sweep.search.values() if kind == "grid"]
    return math.prod(grid) * sweep.num_samples


def describe_space(sweep: Sweep) -> list[str]:
    """One line per searched key, e.g. "ratbptt.window  grid [10, 20, 40]"."""
    width = max(len(key) for key in sweep.search)
    return [f"{key.ljust(width)}  {kind} {args}" for key, (kind, args) in sweep.search.items()]


def corners(sweep: Sweep) -> list[tuple[dict, DistillConfig]]:
    """The valid samples among the corners of the space: every grid / choice value and both ends of every range.

    Nothing is drawn up front, so these stand in for the samples to come: the largest trial that can run (most
    workers, most meta-steps) is among them, which is what the cluster check and ASHA's max_t need. ConfigError
    when no corner is valid (the search space, not a single sample, is wrong).
    """
    ends = [_ends(kind, args) for kind, args in sweep.search.values()]
    valid, reasons = [], []
    for combo in itertools.islice(itertools.product(*ends), MAX_CORNERS):
        params = dict(zip(sweep.search, combo))
        try:
            valid.append((params, trial_config(sweep, params, check_paths=False)[0]))
        except ConfigError as exc:
            reasons.append((params, exc))
    if not valid:
        params, exc = reasons[0]
        raise ConfigError(f"search: every corner of the search space is invalid, e.g. {params}: {exc}")
    return valid


def _ends(kind: str, args: list) -> list:
    values = [args[0], args[1] - 1] if kind == "randint" else list(args)  # randint's high is exclusive
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        values = sorted(values, reverse=True)  # the largest first, so a cut product keeps them
    return values
