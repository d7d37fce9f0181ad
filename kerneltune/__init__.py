"""kerneltune: find faster attention and optimizer kernels, measured by an evaluator nobody can fool."""

__version__ = "0.1.0"
