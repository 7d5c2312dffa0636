"""``python -m serving.cli``: the ``fermion`` command."""

import sys

from serving.cli import main

sys.exit(main())
