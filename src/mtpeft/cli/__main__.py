"""``python -m mtpeft.cli``: the same as the ``mtpeft`` command (accelerate launch and torchrun use this form)."""

import sys

from . import main

sys.exit(main())
