"""``python -m batchnorm``: the ``batchnorm`` command (:mod:`batchnorm.cli`)."""

import sys

from batchnorm.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
