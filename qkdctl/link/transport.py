"""A blocking in-process transport: two threads of one process as the two hosts.

:class:`QueueTransport` has the semantics of a channel of a
:class:`~qkdctl.link.mux.Link`: frames arrive whole and in order, and
:meth:`~QueueTransport.recv_bytes` waits for the next one (up to ``timeout``
seconds; ``None``: for ever) rather than failing at once as
:class:`qkdctl.auth.LocalTransport` does. Closing either end wakes a waiting
receiver on the other with :class:`~qkdctl.auth.TransportError`.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..auth import Transport, TransportError

__all__ = ["QueueTransport"]


class QueueTransport(Transport):
    """One end of a thread-safe in-process transport; make both with :meth:`pair`."""

    def __init__(self, name: str, cond: threading.Condition, timeout: float | None = None):
        self.name = name
        self.timeout = timeout
        self._cond = cond
        self.inbox: deque[bytes] = deque()
        self.peer: QueueTransport | None = None
        self.closed = False

    @classmethod
    def pair(cls, names: tuple[str, str] = ("alice", "bob"), *,
             timeout: float | None = None) -> tuple[QueueTransport, QueueTransport]:
        cond = threading.Condition()
        a, b = cls(names[0], cond, timeout), cls(names[1], cond, timeout)
        a.peer, b.peer = b, a
        return a, b

    def __repr__(self) -> str:
        return f"QueueTransport({self.name!r}, waiting={len(self.inbox)}, closed={self.closed})"

    def send_bytes(self, data: bytes) -> None:
        with self._cond:
            if self.closed:
                raise TransportError(f"{self.name}: transport is closed")
            if self.peer is None or self.peer.closed:
                raise TransportError(f"{self.name}: the peer closed the connection")
            self.peer.inbox.append(bytes(data))
            self._cond.notify_all()

    def recv_bytes(self) -> bytes:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._cond:
            while not self.inbox:
                if self.closed:
                    raise TransportError(f"{self.name}: transport is closed")
                if self.peer is None or self.peer.closed:
                    raise TransportError(f"{self.name}: the peer closed the connection")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransportError(f"{self.name}: no frame from the peer within "
                                         f"{self.timeout} s")
                self._cond.wait(left)
            return self.inbox.popleft()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
