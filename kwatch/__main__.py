"""``python -m kwatch``: the same as the ``kwatch`` command (how a local agent is started on a pipe)."""

import sys

from kwatch.cli import main

sys.exit(main())
