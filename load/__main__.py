"""``python -m load``: the load generator's command line."""

import sys

from .cli import main

sys.exit(main())
