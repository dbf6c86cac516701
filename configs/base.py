"""Every knob of minicpm-jax, with its default. Other configs start here and override what differs.

The knobs and their defaults are the typed sections of minicpm_jax/config.py (ModelConfig, TrainConfig,
ScheduleConfig, OptimConfig, CheckpointConfig, MeshConfig, DataConfig), each field documented there;
this file returns them as a config, so the two cannot disagree. The model defaults are MiniCPM-2.4B and
its μP scalars the paper's wind-tunnel optimum (docs/recipe.md).
"""

from minicpm_jax import config as config_lib


def get_config():
    return config_lib.defaults()
