"""echo-jax: train and run the Echo text-to-speech Diffusion Transformer with JAX."""
