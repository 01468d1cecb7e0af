"""Runtime reference: apply each method for real and measure one training step."""

import logging

# peft and galore-torch import bitsandbytes, whose CPU backend warns on import that an optional
# quantisation kernel is missing; nothing here quantises, so that line is only noise in the output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
