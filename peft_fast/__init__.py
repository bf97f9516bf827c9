"""peft_fast: Hugging Face peft's API, with fused kernels behind it."""

__version__ = "0.1.0"

from .ops import available_backends, get_backend, set_backend, use_backend  # noqa: E402
from .patch import patch_peft, unpatch_peft  # noqa: E402
