"""DM as a Method (method.py) and its loss (loss.py)."""
