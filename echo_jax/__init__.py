"""echo-jax: train and run the Echo text-to-speech Diffusion Transformer with JAX."""

from echo_jax.storage import choose_gcs_client

choose_gcs_client()
