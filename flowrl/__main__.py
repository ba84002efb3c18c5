<<<<<<< HEAD
"""``python -m flowrl``: the same as the ``flowrl`` command."""
=======
"""``python -m flowrl ...`` (also what ``torchrun -m flowrl`` and ``accelerate launch -m flowrl`` run)."""
>>>>>>> main

import sys

from flowrl.cli import main

sys.exit(main())
