"""Training: state and optimizer, the jitted steps, the loop and its hooks."""
