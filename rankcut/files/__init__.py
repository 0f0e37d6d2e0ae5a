"""File contracts: checkpoints, statistics files, foreign weights, tensors, atomic writes."""
