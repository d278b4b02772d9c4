"""The training engine: one loop (loop.py) for every method, on Ray Train (worker.py, launch.py) or in
one process (local.py). See docs/architecture.md."""
