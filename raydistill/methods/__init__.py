"""Distillation methods: the Method interface, its registry, and the methods themselves (ratbptt/)."""

from raydistill.methods.base import IMAGES, SOFT_LABELS, Gradient, Learnable, Method, task_seed
from raydistill.methods.registry import get_method, method_names

__all__ = ["IMAGES", "SOFT_LABELS", "Gradient", "Learnable", "Method", "get_method", "method_names", "task_seed"]
