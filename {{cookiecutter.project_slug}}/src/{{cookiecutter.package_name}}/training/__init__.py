"""Training: the LightningModule and what it composes (rollout, updater, options, rewards, data, metrics, the log)."""
