"""A TCP proxy on 127.0.0.1 in front of the moto server that can go down and come back: an S3
outage made of real refused connections, for the retry tests."""

from __future__ import annotations

import socket
import threading
import time


class OutageProxy:
    """Forwards 127.0.0.1:``port`` to ``target``. :meth:`down` closes every connection and stops
    listening (clients get "connection refused"); :meth:`up` listens again on the same port.
    ``trip`` (bytes): the first request carrying them takes the proxy down for ``trip_s``."""

    def __init__(self, target_port: int, trip: bytes = b"", trip_s: float = 0.0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.trip, self.trip_s = trip, trip_s
        self.tripped_at: float | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone keeps the port listening
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def outage(self, seconds: float) -> None:
        """Down now, up again after ``seconds`` (in the background)."""
        self.down()
        threading.Timer(seconds, self.up).start()

    def close(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(65536):
                if request and self.trip and self.tripped_at is None and self.trip in data:
                    self.tripped_at = time.monotonic()
                    self.outage(self.trip_s)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
