"""Serving: SavedModels for TF Serving (``saved_model``), keras_hub and Hugging Face
presets (``presets``), and the fresh-process check of an export (``check``)."""
