"""systemd's sd_notify protocol, without libsystemd: one datagram to $NOTIFY_SOCKET.

Type=notify units wait for READY=1 before they count as started and show
STATUS= in `systemctl status`; RELOADING=1/STOPPING=1 keep `systemctl reload`
and `stop` honest. A leading `@` names an abstract socket. Failures are
reported once through the callback and never stop the server.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    return addr


def notify(state: str | None, status: str | None = None, on_error: Callable[[str], None] | None = None) -> bool:
    """Send `state` (e.g. READY=1) and `STATUS=status`; False when nothing could be sent."""
    addr = _address()
    if addr is None:
        return False
    lines = [s for s in (state, f"STATUS={status}" if status is not None else None) if s]
    if not lines:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.connect(addr)
            sock.sendall("\n".join(lines).encode())
    except OSError as e:
        if on_error is not None:
            on_error(f"systemd: failed to notify: {e.strerror or e}")
        return False
    return True
