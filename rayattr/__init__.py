"""rayattr: Ray-distributed gradient-based training-data attribution for language models."""

__version__ = "0.1.0"
