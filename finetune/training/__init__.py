"""Components of the train stage: batching, attention for packed batches, checkpoints. Plain functions, no recipe."""
