"""PPO on one process group: experience (generate, score, advantages), the update step, KL control."""
