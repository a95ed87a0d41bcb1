"""The mirror end of replication (``kwatch agent``): the other side of the wire from :mod:`kwatch.replicate`.

- ``server``    the agent: drives an :class:`~kwatch.protocols.agent.AgentConnection` in the receiver role over a
                byte stream and turns each operation into a Receiver call (manifests, signatures, puts, deltas).
- ``receiver``  everything written to a mirror goes through it: paths confined beneath the root (openat2 or a
                component walk, never following a symlink), content through temporaries renamed into place.

It shares the pure pieces with the sending side (``kwatch.replicate.delta``, ``kwatch.replicate.scan``) and the
protocol (``kwatch.protocols.agent``); nothing on the sending side imports it, except the ``kwatch agent`` command.
"""
