"""The daemon: ``kwatch run`` (capture -> rules -> actions, reload, drain, metrics) and ``kwatch check-config``.

- ``core``      the Daemon loop (epoll over the capture source, the action runner and a signal pipe), self-feedback
                suppression, stats, SIGHUP reload, SIGTERM drain; the EventSink hook for replication.
- ``roots``     which trees to capture, derived from the rules' anchored regexes. Pure.
- ``replication`` the EventSink that feeds every captured batch to the config's replicators (kwatch.replicate).
- ``logs``      structured log lines (key=value or JSON) on stderr.
- ``commands``  the argparse commands; :func:`add_commands` registers them on the ``kwatch`` parser.

Nothing imports this package but :mod:`kwatch.cli`.
"""

from kwatch.daemon.commands import add_commands
from kwatch.daemon.core import Daemon, EventSink

__all__ = ["Daemon", "EventSink", "add_commands"]
