"""compress: structured pruning, fine-tuning and deployment-focused measurement of vision models."""

__version__ = "0.1.0"
