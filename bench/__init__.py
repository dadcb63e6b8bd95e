"""eP-ALM benchmark (see run.py)."""
