"""Models: loading (HF, LoRA, builtin tiny models), sampling, reward-model scoring, ground-truth rewards."""
