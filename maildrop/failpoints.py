"""Failpoints: named spots where a test can have the agent killed -9, exactly there.

``MAILDROP_FAILPOINT=<name>`` in the agent's environment makes ``failpoint(name)`` send the
agent SIGKILL when it is reached: the crash a power cut or an OOM kill would cause at that
spot, without a race to win. Unset (always, outside tests) it costs one dict lookup. The
names in use (docs/durability.md lists what each one proves):

- ``receive.before_append``: a receiver's batch is fsynced and renamed into the spool, and
  its one log append has not happened yet.
- ``notice.before_store``: a ``notice`` frame passed its checks and nothing of it is stored
  or handed over yet (its sender must keep every notice of it).
"""

from __future__ import annotations

import os
import signal

ENV = "MAILDROP_FAILPOINT"


def failpoint(name: str) -> None:
    """SIGKILL this process if ``MAILDROP_FAILPOINT`` names ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "failpoint"]
