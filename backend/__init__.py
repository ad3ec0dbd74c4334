"""MapQuery RS backend: PEFT-adapted remote-sensing CLIP models served over ZeroMQ."""
__version__ = "0.1.0"
