"""DC and DSA as Methods (method.py), their loss (loss.py) and DC's original schedule in one process (original.py)."""
