"""A loopback TCP proxy in front of a server that a test can take down and bring back, and slow down.

Down means what a dead endpoint does to its clients: open connections are reset, new ones are
refused (the listening socket is closed). Up listens again on the same port, in front of the same
server and its state. A delay before each write request (PUT, POST, DELETE) stretches a run's
commits, so that a fault lands in its middle without burning CPU.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class Proxy:
    def __init__(self, target_port: int, *, write_delay: float = 0.0, request_delay: float = 0.0):
        # request_delay: before every request, as a far region's round trip would add
        self.target, self.write_delay, self.request_delay = ("127.0.0.1", target_port), write_delay, request_delay
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port, self.listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = list(self.conns), set()
        if listener is not None:
            listener.close()
        for c in conns:
            try:  # linger 0: close sends RST, as a crashed server's kernel would
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        self.down()
        time.sleep(seconds)
        self.up()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                if self.listener is not listener:
                    client.close(), server.close()
                    return
                self.conns.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and self.write_delay and data.startswith((b"PUT ", b"POST ", b"DELETE ")):
                    time.sleep(self.write_delay)
                if upstream and self.request_delay and data.startswith((b"GET ", b"HEAD ", b"PUT ", b"POST ")):
                    time.sleep(self.request_delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self.lock:
                self.conns.discard(src), self.conns.discard(dst)
