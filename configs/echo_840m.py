"""Echo 840M on DACVAE latents: 835.0M parameters (decoder 1280×24, 10 heads; encoders 768×8, 6 heads).

    ./launch.sh --tpu NAME --zone ZONE -- --config=configs/echo_840m.py \
        --config.data.train_shards='hf://datasets/ORG/NAME/train-*.tar' --workdir=gs://BUCKET/runs/echo_840m
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(dim=1280, layers=24, heads=10, mlp_dim=3456,
                      text_dim=768, text_layers=8, text_heads=6, text_mlp_dim=2048,
                      speaker_dim=768, speaker_layers=8, speaker_heads=6, speaker_mlp_dim=2048,
                      dtype="bfloat16", remat="dots_no_batch")
  config.train.batch_size = 256
  # On a v4-64 the mesh follows the chips' torus: each host holds 4 blocks of 8 rows of the batch, which need streams
  # of at most 8 rows (the trainer refuses fewer streams at its launch; `python -m echo_jax.aot` says so too). On one
  # machine set --config.data.streams=1 (or any divisor of the batch).
  config.data.streams = 32
  config.train.steps = 1_000_000
  return config
