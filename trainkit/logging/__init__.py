"""What a run reports as it goes: `metrics` (metrics.jsonl and TensorBoard), `progress` (the console line),
`wandb_run` (Weights & Biases, resumed with the run)."""
