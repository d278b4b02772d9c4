"""Training: the pure step, the single-process loop, and (later) Ray Train workers."""
