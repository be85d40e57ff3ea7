"""``python -m moeguard``: the same command line as the ``moeguard`` script."""

import sys

from moeguard.cli import main

sys.exit(main())
