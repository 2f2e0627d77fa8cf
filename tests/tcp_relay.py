"""A TCP relay for tests: forwards 127.0.0.1:<port> to a server, can be taken down and brought back.

``down()`` closes the listening socket and every open connection (a client sees its transfer cut and
its new connections refused, as when a server stops); ``up()`` listens on the same port again. With
``bytes_per_second`` the relay throttles what the server sends, so a download lasts long enough to be
cut in the middle.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from local_head import free_port


class TcpRelay:
    """127.0.0.1:<port> -> ``target`` (host, port), in daemon threads of this process."""

    def __init__(self, target: tuple[str, int], bytes_per_second: float | None = None):
        self.target = target
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bytes_per_second = bytes_per_second
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        """Accept connections (again) on the relay's port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.bytes_per_second), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop relaying for good."""
        self.down()
