"""``python -m flowrl``: the same as the ``flowrl`` command."""

import sys

from flowrl.cli import main

sys.exit(main())
