"""Models: the architecture registry (``registry``), the trained Keras models
(``lm``: CausalLM, MaskedLM) and text generation in TF ops (``generation``)."""
