"""Training data: tar shards of codec latents, the streaming pipeline, and the demo corpus."""
