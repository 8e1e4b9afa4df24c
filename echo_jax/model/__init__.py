"""The Echo model: `Echo` (the DiT with its encoders) and `EchoConfig` (its hyper-parameters)."""

from echo_jax.model.echo import Context, Echo, EchoConfig

__all__ = ["Context", "Echo", "EchoConfig"]
