"""Training of the PEFT methods: losses, datasets and the trainer behind ``python -m backend train``."""
