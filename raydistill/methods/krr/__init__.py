"""Kernel ridge regression methods (FRePo, RFAD, KIP) on one closed-form solver (solver.py)."""
