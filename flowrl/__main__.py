"""``python -m flowrl ...`` (also what ``torchrun -m flowrl`` and ``accelerate launch -m flowrl`` run)."""

import sys

from flowrl.cli import main

sys.exit(main())
