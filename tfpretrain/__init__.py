"""tfpretrain: pretrain small language models with Keras 3 on TensorFlow."""
__version__ = "0.1.0"

import time as _time

PROCESS_START = _time.time()  # for "time to first step", which includes imports
