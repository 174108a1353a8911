"""Training: optimizer, the pure train step, and (with sharding) the loop."""
