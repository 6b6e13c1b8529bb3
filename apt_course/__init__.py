"""APT Course companion package: LLM post-training from the ground up.

One module per chapter (``mdp``, ``reinforce``, ``ppo``, ``sft``, ...) plus the shared parts:
``utils`` (device, seed, versions), ``world`` (the tiny world), ``tokenizer``, ``model``,
``lm`` (generation, log-probabilities), ``results`` (recorder), ``plots``, ``exercises``.
"""

import os

from .utils import block_network, get_device, print_versions, set_seed, setup_notebook

__version__ = "0.1.0"

if os.environ.get("APT_COURSE_BLOCK_NETWORK") == "1":
    block_network()

__all__ = ["get_device", "set_seed", "print_versions", "setup_notebook", "block_network", "__version__"]
