"""A run's bookkeeping: its folders and manifests (runs), the typed records stages hand each other (artifacts),
when a stage's outputs are stale (freshness: the stage graph), and `finetune run`, which walks it (pipeline)."""
