"""``python -m cpsample_fast`` is the ``cpsample`` command line."""

import sys

from .cli.__main__ import main

sys.exit(main())
