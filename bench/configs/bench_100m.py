"""A ~100M-parameter Echo for CPU benchmarks: 104.5M parameters (decoder 768×8, 12 heads; encoders 384×3, 6 heads).

Shapes are those of a 10-second utterance (256 frames at 25 frames/s) so a train step takes seconds on a CPU:

    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/train_step.py --configs=bench_100m
    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/checkpoint.py --config=bench_100m
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(latent_dim=128, dim=768, layers=8, heads=12, mlp_dim=2048,
                      text_dim=384, text_layers=3, text_heads=6, text_mlp_dim=1024,
                      speaker_dim=384, speaker_layers=3, speaker_heads=6, speaker_mlp_dim=1024,
                      timestep_dim=512, adaln_rank=256, dtype="float32", remat="none")
  config.codec = "none"
  config.data.max_text_len = 192
  config.data.max_frames = 256
  config.data.max_ref_frames = 128
  config.train.batch_size = 4
  config.train.steps = 1000
  return config
