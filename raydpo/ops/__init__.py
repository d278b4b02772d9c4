"""The maths at the bottom of raydpo: log-probabilities, reward-model scores and PPO's algebra.

Pure torch: no Ray, no MLflow, no I/O, no model loading (docs/architecture.md, layer "maths").
"""
