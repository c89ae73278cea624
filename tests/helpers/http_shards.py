"""A file server on 127.0.0.1 for shard tests: folders get an index page, ``Range`` is honoured when
``srv.ranges``, and ``srv.drop[path] = n`` cuts GET number ``n`` of ``path`` (1-based) after
``srv.cut_at`` bytes of the file (half the file when None), closing the connection."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - the http.server name
        srv = self.server
        path = srv.root / self.path.lstrip("/")
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if path.is_dir():
            links = "".join(f'<a href="{p.name}{"/" if p.is_dir() else ""}">{p.name}</a>\n'
                            for p in sorted(path.iterdir()))
            self._send(200, f"<html><body>{links}</body></html>".encode(), {"Content-Type": "text/html"})
            return
        if not path.is_file():
            self.send_error(404, "File not found")
            return
        data, start, headers = path.read_bytes(), 0, {}
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        gets = srv.gets[self.path] = srv.gets.get(self.path, 0) + 1
        cut = None
        if srv.drop.get(self.path) == gets or srv.drop.get(self.path) == "always":
            cut = (len(data) // 2 if srv.cut_at is None else srv.cut_at) - start
            if cut <= 0:
                cut = (len(data) - start) // 2
            srv.dropped.append(self.path)
        self._send(206 if start or "Content-Range" in headers else 200, data[start:], headers, cut)

    def _send(self, code, body, headers, cut=None):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))  # the full length, also when cut short
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


@contextlib.contextmanager
def serve(root: Path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.root, srv.ranges, srv.cut_at = Path(root), True, None
    srv.drop, srv.gets, srv.dropped, srv.requests = {}, {}, [], []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
