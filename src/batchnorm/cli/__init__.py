"""The ``batchnorm`` command (also ``python -m batchnorm``): the argparse front of ``demo``,
``bench`` and ``inspect``, one module per sub-command.
"""

from batchnorm.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
