"""Ray Tune sweeps: each trial is one distillation (or Boost-DD) run with its own parameter server and workers.

- sweep.py       the sweep file: load, parse, check; the full config of one sample (`trial_config`)
- space.py       the search space as Tune domains, the searcher (Tune's basic generator or Optuna), its corners
- trial.py       the trainable: reject an invalid sample, place, run, report, checkpoint, restart
- experiment.py  the Tuner: build, run or resume (`run_sweep`), the checks made before anything starts
- report.py      results.csv, the printed table, best.yaml, plot.png
"""

from raydistill.tune.experiment import Interrupted, build_tuner, run_sweep
from raydistill.tune.report import write_outputs
from raydistill.tune.space import corners, make_searcher, search_space
from raydistill.tune.sweep import Sweep, load_sweep, total_steps, trial_config
from raydistill.tune.trial import WORST_SCORE, checked_config, run_trial, trial_resources

__all__ = ["WORST_SCORE", "Interrupted", "Sweep", "build_tuner", "checked_config", "corners", "load_sweep",
           "make_searcher", "run_sweep", "run_trial", "search_space", "total_steps", "trial_config",
           "trial_resources", "write_outputs"]
