"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) in a few lines, stdlib only.

Every function is safe to call when not run by systemd: without ``$NOTIFY_SOCKET`` it does
nothing and returns False. Nothing here ever raises; a failed send is logged at debug level
and reported as False (the agent must not die because systemd's socket went away).
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog_interval", "watchdog_ping"]

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=value`` lines) as one datagram to ``$NOTIFY_SOCKET``.

    A leading ``@`` in the address means the Linux abstract namespace. Returns True if the
    datagram was sent, False if the variable is unset or sending failed. Never raises.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    try:
        if address[0] == "@":
            target = "\0" + address[1:]
        elif address[0] == "/":
            target = address
        else:  # e.g. "vsock:..." (systemd >= 254): not for a service on this host
            log.debug("unsupported NOTIFY_SOCKET %r; not notifying", address)
            return False
        data = message.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, target)
        return True
    except Exception as exc:  # never raise: notification is best effort
        log.debug("sd_notify %r to %r failed: %s", message, address, exc)
        return False


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the datagram.
    return " ".join(str(text).splitlines())


def ready(status: str = "") -> bool:
    """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def stopping() -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``); send it on SIGTERM."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status`` (``STATUS=...``)."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """Seconds between :func:`watchdog_ping` calls, or None if systemd's watchdog is off.

    Half of ``$WATCHDOG_USEC``, and only if ``$WATCHDOG_PID`` is unset or is this process
    (a child that inherited the variables must not ping for its parent).
    """
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def watchdog_ping() -> bool:
    """Tell systemd the service is alive (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")
