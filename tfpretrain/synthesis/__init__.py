"""Synthetic data with a teacher: self-instruct bootstrapping, Evol-style rewriting and
sequence-level distillation (``python -m tfpretrain.synth``)."""
