"""A loopback S3 server for the tests (moto's server mode on 127.0.0.1), and a fault proxy.

:class:`FaultProxy` sits between a client and the server. It makes every request use a
fresh connection (it forwards ``Connection: close``), so it sees each request line, and
a rule can answer one with a throttling error (``503 SlowDown``), a refusal (``403
AccessDenied``), reset the connection,
or hold it for ever without an answer (a stuck upload).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Callable

from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)

SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: 120\r\n\r\n"
    + b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>1</RequestId></Error>".ljust(120)
)


DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: 120\r\n\r\n"
    + b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message>"
    b"<RequestId>2</RequestId></Error>".ljust(120)
)


class S3Server:
    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def auth(self, on: bool) -> None:
        """Check request signatures against moto's IAM users (unknown keys are refused)."""
        data = b"0" if on else b"inf"
        req = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth",
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self.server.stop()


Rule = Callable[[str], str]  # request line -> "pass" | "throttle" | "deny" | "reset" | "stall"


class FaultProxy:
    def __init__(self, upstream: str, rule: Rule) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rule = rule
        self.seen: list[tuple[str, str]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            held, self._held = self._held, []
        with contextlib.suppress(OSError):
            self.sock.close()
        for s in held:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                data = conn.recv(65536)
            except OSError:
                conn.close()
                return
            if not data:
                conn.close()
                return
            head += data
        header, _, rest = head.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        request = lines[0].decode("latin-1")
        action = self.rule(request)
        self.seen.append((request, action))
        if action in ("throttle", "deny"):
            with contextlib.suppress(OSError):
                conn.sendall(SLOWDOWN if action == "throttle" else DENIED)
            conn.close()
            return
        if action == "reset":
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()
            return
        if action == "stall":
            with self._lock:  # never answered; closed when the proxy stops
                if not self.stopped.is_set():
                    self._held.append(conn)
                    return
            conn.close()  # (a request that came in as it stopped: never left open)
            return
        kept = [ln for ln in lines[1:] if not ln.lower().startswith(b"connection:")]
        out = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + rest
        try:
            up = socket.create_connection(self.upstream)
        except OSError:
            conn.close()
            return
        with contextlib.suppress(OSError):
            up.sendall(out)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(conn, up), daemon=True)
        t.start()
        pump(up, conn)
        conn.close()
        up.close()
