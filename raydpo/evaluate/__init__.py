"""Evaluation: win rates with confidence intervals, KL to the reference, reward–KL frontiers."""
