"""Subcommands registered by ``backend.cli``: each module defines ``add_parser(subparsers)``."""
