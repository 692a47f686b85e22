"""A local S3 endpoint for the object-store tests: a moto server behind a TCP front that a test can cut.

The front is what clients know as the endpoint (``AWS_ENDPOINT_URL``). Cutting it closes its port and
every open connection, so clients see what a dead endpoint gives them (connection refused or reset);
restoring it listens on the same port again. The moto server behind it keeps the bucket, as a real
store keeps its objects through an outage of its front end: moto holds its state in memory only, so
killing moto itself would model losing the data, not an outage.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

# Settings every client reads from the environment: pyarrow's S3FileSystem (AWS_ENDPOINT_URL, the
# region, the keys) and Lance's object_store (the same, and AWS_ALLOW_HTTP for a plain-HTTP endpoint).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
# A developer's own AWS settings, which would send the tests elsewhere.
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Front:
    """A TCP relay on 127.0.0.1 to an upstream port, set later (until then, and while cut, it refuses)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.upstream: int | None = None
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen on the port again (the endpoint is back)."""
        if self.listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the port and every open connection (the endpoint is gone)."""
        with self.lock:
            listener, self.listener = self.listener, None
            connections, self.connections = self.connections, set()
        if listener is not None:
            _close(listener)
        for connection in connections:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            if self.upstream is None:
                _close(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                _close(client)
                continue
            with self.lock:
                if self.listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(server)
                    return
                self.connections |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self.lock:
            self.connections -= {source, sink}
        _close(source)
        _close(sink)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()


def start_moto(port: int, timeout: float = 60.0) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1:``port``, once it answers."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with status {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"moto server did not answer on port {port} within {timeout:.0f} s")
