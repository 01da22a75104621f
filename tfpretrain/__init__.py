"""tfpretrain: pretrain small language models with Keras 3 on TensorFlow."""
__version__ = "0.1.0"
