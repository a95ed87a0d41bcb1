"""Process ancestry from /proc for the ``exclude_descendants_of`` filter: the one module of ``rules`` that reads
the system (the daemon passes it to ``Config.match``; matching itself stays pure and takes any ProcessTree).

A process that has already exited has no /proc entry; its ancestry is then unknown (empty) and only the event's
own pid and comm are checked. Capture backends that track fork/exit can supply a better ProcessTree.
"""

from __future__ import annotations

from collections.abc import Sequence

from kwatch.context import ProcInfo, Resolver
from kwatch.events import FileEvent


class ProcFS:
    def __init__(self, root: str = "/proc", max_depth: int = 64, resolver: Resolver | None = None) -> None:
        self.root = root
        self.max_depth = max_depth
        # the daemon passes the one its outputs use (one cache of process context); else made on first use: most
        # configs filter on no context
        self._resolver = resolver

    def context(self, ev: FileEvent) -> ProcInfo | None:
        if self._resolver is None:
            self._resolver = Resolver(self.root)
        return self._resolver(ev)

    def _stat(self, pid: int) -> tuple[bytes, int] | None:
        try:
            with open(f"{self.root}/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        # comm is in parentheses and may itself hold ')' or spaces: the last ')' ends it (proc_pid_stat(5)).
        lpar, rpar = data.find(b"("), data.rfind(b")")
        if lpar < 0 or rpar < 0:
            return None
        fields = data[rpar + 2 :].split()
        try:
            return data[lpar + 1 : rpar], int(fields[1])
        except (IndexError, ValueError):
            return None

    def ancestry(self, pid: int) -> Sequence[tuple[int, bytes]]:
        chain: list[tuple[int, bytes]] = []
        while pid > 0 and len(chain) < self.max_depth:
            st = self._stat(pid)
            if st is None:
                break
            chain.append((pid, st[0]))
            pid = st[1]
        return chain
