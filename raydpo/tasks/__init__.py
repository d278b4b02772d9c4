"""Built-in tasks that run fully offline (no downloads), e.g. controlled sentiment generation.

Each task module provides its corpus, prompts, ground-truth reward and pair labelling as pure
functions; the Ray-side preparation (training the tiny LM, sampling, writing pairs) lives elsewhere.
"""
