"""synrep: train vision encoders from generative models, and select their data with models."""

__version__ = "0.1.0"
