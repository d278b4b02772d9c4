"""Sweeps: a sweep file → Ray Tune trials, each one training run (run.py), and their summary (report.py)."""

from raydpo.sweep.run import SearchDim, check_resources, load_sweep, run_sweep

__all__ = ["SearchDim", "check_resources", "load_sweep", "run_sweep"]
