"""``python -m cnnc``: the same as the ``cnnc`` command."""

import sys

from cnnc.cli import main

sys.exit(main())
