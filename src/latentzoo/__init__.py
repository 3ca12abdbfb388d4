"""latentzoo: train, sweep, scale out and evaluate latent-variable generative models."""

from omegaconf import OmegaConf

from latentzoo.paths import run_id

__version__ = "0.1.0"

# Arithmetic in configs, e.g. `out_features: ${mul:2,${model.latent_dim}}` (mean and log-variance).
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
# e.g. `resolution: ${add:${data.image_size},${mul:2,${data.pad}}}` (a padded image side).
OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)
# Run and sweep dir names: `<date>_<time>_<unique suffix>` (configs/hydra/default.yaml).
OmegaConf.register_new_resolver("latentzoo.run_id", run_id, use_cache=True, replace=True)
