"""A small threaded HTTPS server on loopback that serves MTA-STS policy files by Host header."""

from __future__ import annotations

import http.server
import ssl
import threading
from pathlib import Path

__all__ = ["HTTPSServer"]

Route = tuple[int, str, bytes, dict[str, str]]  # status, content type, body, extra headers


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        self.server.owner.requests.append((host, self.path))
        route: Route = self.server.owner.routes.get((host, self.path)) or (404, "text/plain", b"not found\n", {})
        status, ctype, body, extra = route
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: HTTPSServer


class HTTPSServer:
    """HTTPSServer(cert, key, host, port); `policy(domain, text)` publishes an MTA-STS policy."""

    def __init__(self, cert: Path, key: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[tuple[str, str]] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.httpd = _Server((host, port), _Handler, bind_and_activate=True)
        self.httpd.owner = self
        self.httpd.socket = self.ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def route(self, host: str, path: str, status: int, ctype: str, body: bytes, **headers: str) -> None:
        self.routes[(host.lower(), path)] = (status, ctype, body, headers)

    def policy(self, domain: str, text: str, ctype: str = "text/plain") -> None:
        self.route(f"mta-sts.{domain}", "/.well-known/mta-sts.txt", 200, ctype, text.encode())

    def fetched(self, domain: str) -> int:
        return sum(1 for h, _ in self.requests if h == f"mta-sts.{domain}")

    def start(self) -> HTTPSServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> HTTPSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
