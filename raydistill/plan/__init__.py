"""The memory planner: will a config fit its devices, and what would make it fit (`raydistill plan`).

Each gradient task is rehearsed on the meta device (raydistill.methods.rehearsal); the devices' calibrations,
the held data and the runtime make a plan (estimate.py); the methods' memory levers make it fit (fit.py).
"""

from raydistill.methods.rehearsal import DataShape, TaskMemory
from raydistill.plan.devices import CPU, GPUS, HEADROOM, Device, format_bytes, gpu, gpu_of_size, parse_memory
from raydistill.plan.estimate import Estimate, Plan, plan, task_estimate
from raydistill.plan.fit import Suggestion, suggest, with_changes
from raydistill.plan.presets import preset_peak, preset_plan
from raydistill.plan.shapes import PlanData, from_dataset, plan_data

__all__ = ["CPU", "GPUS", "HEADROOM", "DataShape", "Device", "Estimate", "Plan", "PlanData", "Suggestion",
           "TaskMemory", "format_bytes", "from_dataset", "gpu", "gpu_of_size", "parse_memory", "plan", "plan_data",
           "preset_peak", "preset_plan", "suggest", "task_estimate", "with_changes"]
