"""The RLHF side of the comparison: SFT, reward model, PPO and best-of-N baselines."""
