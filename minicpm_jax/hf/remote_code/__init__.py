"""Remote-code files that `export-hf --arch minicpm --remote-code` copies into an export (see `hf.convert`).

They import torch and transformers, and are meant to run inside transformers (`trust_remote_code=True`), so
nothing here imports them.
"""

import pathlib

FILES = ("configuration_minicpm.py", "modeling_minicpm.py")
FOLDER = pathlib.Path(__file__).parent
# What transformers reads from config.json to find them; OpenBMB's MiniCPM files define the same classes.
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
ROPE_SCALINGS = ("default", "linear", "dynamic")
