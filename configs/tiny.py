"""A tiny Echo for tests: 0.22M parameters, 8-d latents, 32 frames. Trains in seconds on a CPU.

    python -c "import pathlib, sys; sys.path.insert(0, 'tests'); from conftest import write_synthetic_shards; \
        write_synthetic_shards(pathlib.Path('data/tiny'))"  # 8 random samples, as the tests make them
    python train_pretrain.py --config=configs/tiny.py --config.data.train_shards='data/tiny/*.tar' \
        --config.train.steps=100 --workdir=runs/tiny
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(latent_dim=8, dim=64, layers=2, heads=4, mlp_dim=192,
                      text_dim=32, text_layers=1, text_heads=2, text_mlp_dim=96,
                      speaker_dim=32, speaker_layers=1, speaker_heads=2, speaker_mlp_dim=96,
                      timestep_dim=64, adaln_rank=16)
  config.data.max_text_len = 32
  config.data.max_frames = 32
  config.data.max_ref_frames = 16
  config.train.batch_size = 8
  config.train.steps = 100
  config.train.lr = 3e-3
  config.train.log_every = 1
  config.train.eval_every = 50
  config.train.eval_batches = 1
  config.train.ckpt_every = 50
  config.codec = "none"
  return config
