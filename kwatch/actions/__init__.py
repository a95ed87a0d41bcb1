"""Actions: run shell commands for matched events, with placeholders passed as data, never as code.

- ``shell``     placeholder compilation (each placeholder becomes a quoted variable reference), the exact argv/env
                of a run (ExecSpec), ARG_MAX chunking. Pure.
- ``schedule``  debounce, per-file coalescing, batches, global and per-rule caps; time passed in. Pure.
- ``privileges`` who an action runs as (config ``user``/``group``, resolved with its groups) and the environment
                allowlist it gets; reads the account databases.
- ``runner``    the process side: new session per action, timeouts (SIGTERM then SIGKILL to the group), reaping,
                stderr capture, the on_start pid callback, dry runs.
"""
