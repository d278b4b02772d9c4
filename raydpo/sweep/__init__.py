"""Sweeps: a sweep file → Ray Tune trials, each one training run (run.py), and their summary (report.py)."""

from raydpo.sweep.run import check_resources, load_sweep, run_sweep

__all__ = ["check_resources", "load_sweep", "run_sweep"]
