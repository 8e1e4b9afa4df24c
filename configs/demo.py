"""The CPU demo: a 6M-parameter Echo on the eSpeak demo corpus's mel latents (D=128, 25 frames/s).

`make demo` builds the corpus into data/demo and runs `python -m echo_jax.demo`: it starts the dashboard, trains as

    python train_pretrain.py --config=configs/demo.py --workdir=runs/demo

would, then speaks demo.wav from the checkpoint. Training takes about 9 minutes on 2 CPU cores. Expected held-out
eval loss: 4.83 before the first step, about 0.53 after 750 steps (measured 4.8348 -> 0.5278, bitwise the same in two
runs).
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(latent_dim=128, dim=256, layers=4, heads=4, mlp_dim=640,
                      text_dim=128, text_layers=2, text_heads=2, text_mlp_dim=384,
                      speaker_dim=128, speaker_layers=2, speaker_heads=2, speaker_mlp_dim=384,
                      timestep_dim=256, adaln_rank=64)
  config.codec = "mel"
  config.data.train_shards = "data/demo/train-*.tar"
  config.data.eval_shards = "data/demo/eval-*.tar"
  config.data.pad_latent = "data/demo/pad_latent.npy"
  config.data.max_text_len = 96  # the corpus's longest sentence is 72 bytes with "[S1] " and BOS
  config.data.max_frames = 112  # 4.5 s; its longest utterance is 102 frames
  config.data.max_ref_frames = 64
  config.train.batch_size = 16
  config.train.steps = 750
  config.train.lr = 1e-3
  config.train.log_every = 10
  config.train.eval_every = 125
  config.train.eval_batches = 4
  config.train.ckpt_every = 250
  config.samples.every = 375
  config.samples.count = 2
  return config
