"""A TCP relay that adds latency: put it between the mirror and its object store to make every
request to the store slow, as a distant or overloaded S3 is (``delay`` seconds before each piece
sent to the store is passed on; changed while it runs).  With a ``rate``, it also passes the
answers on at that many bytes per second per connection, as a server behind a link of that speed
(benchmarks put it before an upstream on loopback)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class LaggingRelay:
    """Relays ``127.0.0.1:<port>`` to *target* (``host``, ``port``); :attr:`delay` seconds before
    each piece of a request goes on."""

    def __init__(self, target: tuple[str, int], rate: float | None = None) -> None:
        self.target = target
        self.delay = 0.0
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True, name="lagging-relay").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
                if self._stopping:
                    client.close()
                    return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(server)
                if self._stopping:
                    server.close()
                    return
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, lagging: bool) -> None:
        sent, started = 0, 0.0
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if lagging and self.delay:
                    time.sleep(self.delay)
                if not lagging and self.rate:  # paced; an idle moment (between answers) is no credit
                    now = time.perf_counter()
                    due = started + sent / self.rate
                    if not started or now - due > 0.05:
                        started, sent = now, 0
                    elif due > now:
                        time.sleep(due - now)
                    sent += len(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._listener.close()
            for sock in self._sockets:
                sock.close()


@contextlib.contextmanager
def lagging_relay(target: tuple[str, int], rate: float | None = None) -> Iterator[LaggingRelay]:
    relay = LaggingRelay(target, rate)
    try:
        yield relay
    finally:
        relay.close()
