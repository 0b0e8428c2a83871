"""PPO over Ray: each model a Ray actor group running DeepSpeed, vLLM engines for rollouts, one coordinating driver."""
