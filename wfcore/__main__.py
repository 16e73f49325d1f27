"""``python -m wfcore`` (and ``torchrun ... -m wfcore``): the ``wfcore`` command."""

from __future__ import annotations

import sys

from wfcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
