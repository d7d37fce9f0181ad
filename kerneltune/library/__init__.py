"""The library side of kerneltune: tuned kernels behind plain functions, for code that never searches.

``kerneltune.attention`` and ``kerneltune.optim.AdamW`` look up the registry's winner for the device,
shape bucket and dtype of each call (``serve``), and fall back to the reference everywhere else.
"""

from kerneltune.library.attention import attention
from kerneltune.library.serve import decisions, reload, reset_served, served

__all__ = ["attention", "decisions", "reload", "reset_served", "served"]
