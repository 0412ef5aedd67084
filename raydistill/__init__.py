"""raydistill: distributed dataset distillation with RaT-BPTT and Boost-DD."""

__version__ = "0.1.0"
