"""MiniCPM-2.4B (docs/recipe.md §1.2): d 2304, 40 layers, 36 MHA heads, vocab 122,753, tied head.

2,442,057,984 non-embedding parameters. The base config already holds exactly these sizes.
"""

from minicpm_jax.config import sibling


def get_config():
    return sibling(__file__, "base")
