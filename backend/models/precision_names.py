"""The ``--precision`` choices, written once and light: the commands' parsers import them, and QGIS's Python,
which has no torch, imports the commands (``precision`` holds the policy itself)."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
