"""The delta engine imported in the background once an end of the agent link has started.

Both ends need ``kwatch.replicate.delta`` (numpy is most of its import time, 0.1-0.2 s) only once a signature or a
delta is made. Imported at start-up it delays every start, a first sync into an empty mirror included, which never
uses it; imported where it is first used, a live batch pays that import in the middle of replication. Imported in a
daemon thread right after start, neither waits: a batch that needs it before the import has ended waits only for
the rest of it (the import lock).

A one-shot run (``kwatch replicate --once``, whose sender offers the ``oneshot`` hint in its Hello) has no later
batch to prepare for: neither end preloads, and the engine is imported where a file first needs a delta, if one
does. The thread would otherwise take the GIL and a core from the first sync's own start.
"""

from __future__ import annotations

import importlib
import sys
import threading


def preload_delta() -> None:
    if "kwatch.replicate.delta" in sys.modules:  # a reconnect: imported already, no thread needed
        return
    threading.Thread(target=importlib.import_module, args=("kwatch.replicate.delta",), name="preload delta",
                     daemon=True).start()
