"""Training machinery: optimizer, train state, jitted steps, checkpoints, metrics, guards, `fit`."""
