"""``python -m qkdctl``: the ``qkdctl`` command."""

import sys

from .cli import main

sys.exit(main())
