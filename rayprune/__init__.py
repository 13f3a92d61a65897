"""rayprune: data pruning for adversarial training through score extrapolation."""

__version__ = "0.1.0"
