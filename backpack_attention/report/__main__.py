"""``python -m backpack_attention.report [options]``: the ``backpack-attention`` command line."""

import sys

from backpack_attention.report.cli import main

sys.exit(main())
