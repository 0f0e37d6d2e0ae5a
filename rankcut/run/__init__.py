"""Running models over data: loading data, fine-tuning, evaluation, latency."""
