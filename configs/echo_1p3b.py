"""Echo 1.3B on DACVAE latents: 1,304.2M parameters (decoder 1536×24, 12 heads; text and speaker encoders
1024×10, 8 heads). The reference pod config: global batch 256 (8 per chip) on a TPU v4-64, FSDP over 32 chips.

    ./launch.sh --tpu NAME --zone ZONE -- --config=configs/echo_1p3b.py \
        --config.data.train_shards='hf://datasets/ORG/NAME/train-*.tar' --workdir=gs://BUCKET/runs/echo_1p3b

Check that it fits before paying for the pod: `python -m echo_jax.aot --config configs/echo_1p3b.py --topology v4-64`
(13.4 GiB = 41.8% of a v4 chip's HBM with the `dots_no_batch` remat policy, which keeps the matmul outputs and so
recomputes less than `full`; `--config.model.remat=full` needs 6.6 GiB for a larger batch).
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(dim=1536, layers=24, heads=12, mlp_dim=4224,
                      text_dim=1024, text_layers=10, text_heads=8, text_mlp_dim=2816,
                      speaker_dim=1024, speaker_layers=10, speaker_heads=8, speaker_mlp_dim=2816,
                      dtype="bfloat16", remat="dots_no_batch")
  config.train.batch_size = 256
  # On a v4-64 the mesh follows the chips' torus: each host holds 4 blocks of 8 rows of the batch, which need streams
  # of at most 8 rows (the trainer refuses fewer streams at its launch; `python -m echo_jax.aot` says so too). On one
  # machine set --config.data.streams=1 (or any divisor of the batch).
  config.data.streams = 32
  config.train.steps = 1_000_000
  return config
