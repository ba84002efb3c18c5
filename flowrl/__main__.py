"""``python -m flowrl ...``: the same command line as the ``flowrl`` script."""

import sys

from flowrl.cli import main

sys.exit(main())
