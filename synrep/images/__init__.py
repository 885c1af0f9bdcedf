"""Text-to-image synthesis: the images stage, its executors and the shipped mini model."""
