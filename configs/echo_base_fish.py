"""The released upstream Echo checkpoint's shape (jordand/echo-tts-base): 2,380.8M parameters without the blockwise
modules. Latents are the 80-d Fish-S1-DAC + PCA latents (D=80); decoder 2048×24, 16 heads, MLP 5888; text and
speaker encoders 1280×14, 10 heads, MLP 3328.

Fine-tune from the released weights (import them first, see README "Upstream weights"):

    python train_pretrain.py --config=configs/echo_base_fish.py --init_from=converted/ \
        --config.data.train_shards='...' --workdir=runs/fish_ft

echo-jax has no Fish-S1-DAC codec: training samples and inference.py refuse it; export the weights
(`python -m echo_jax.convert export`) and speak them with upstream Echo.
"""

from echo_jax.config import base_config


def get_config():
  config = base_config()
  config.model.update(latent_dim=80, dim=2048, layers=24, heads=16, mlp_dim=5888,
                      text_dim=1280, text_layers=14, text_heads=10, text_mlp_dim=3328,
                      speaker_dim=1280, speaker_layers=14, speaker_heads=10, speaker_mlp_dim=3328,
                      dtype="bfloat16", remat="full")
  config.codec = "fish_pca"
  config.train.batch_size = 256
  return config
