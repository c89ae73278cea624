"""``embedkit ui``: the MLflow UI over the run store, bound to 127.0.0.1 only.

    embedkit ui [tracking.uri=URI] [port=5000] [workers=1]

Runs ``python -m mlflow ui --backend-store-uri <store> --host 127.0.0.1 --port <port>`` in place of
this process (exec), so stopping it (Ctrl-C, or killing its process group) stops the server and its
workers. The store defaults to ``sqlite:///runs/mlflow.db`` of the working directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from embedkit.errors import UserError
from embedkit.tracking.store import default_uri

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
    uri = uri or default_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
