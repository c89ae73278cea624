"""``embedkit ui``: the MLflow UI over the run store, bound to 127.0.0.1 only.

    embedkit ui [tracking.uri=URI] [port=5000] [workers=1]

Runs ``python -m mlflow ui --backend-store-uri <store> --host 127.0.0.1 --port <port>`` in place of
this process (exec), so stopping it (Ctrl-C, or killing its process group) stops the server and its
workers. The store is the one ``fit`` writes (``store.resolve_uri``: ``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db`` of the working directory). A tracking
server (``http://...``) already serves its own UI: ``ui`` says so and starts nothing.
"""

from __future__ import annotations

import os
import sys

from embedkit.errors import UserError
from embedkit.tracking.store import resolve_uri

HOST = "127.0.0.1"


def command(args: list[str]) -> list[str]:
    uri, port, workers = None, "5000", "1"
    for word in args:
        key, eq, value = word.partition("=")
        if not eq:
            raise UserError(f"ui: unexpected {word!r}; usage: embedkit ui [tracking.uri=URI] [port=N] [workers=N]")
        if key == "tracking.uri":
            uri = value
        elif key == "port":
            port = value
        elif key == "workers":
            workers = value
        else:
            raise UserError(f"ui: unknown key {key!r}; accepted: tracking.uri, port, workers")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"port: expected a port number, got {port!r}")
    if not workers.isdigit() or int(workers) < 1:
        raise UserError(f"workers: expected a positive integer, got {workers!r}")
    uri = resolve_uri(uri, create=True)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"ui: the store {uri} is a tracking server, which serves its own UI: open {uri} "
                        "in a browser (embedkit ui starts a UI over a database store only)")
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--host", HOST,
        "--port", port,
        "--workers", workers,
    ]  # fmt: skip


def main(args: list[str]) -> int:
    cmd = command(args)
    print(f"MLflow UI on http://{HOST}:{cmd[cmd.index('--port') + 1]}  (store {cmd[cmd.index('--backend-store-uri') + 1]})",
          flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached
