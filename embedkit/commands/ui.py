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
from dataclasses import dataclass
from typing import Optional

from embedkit.commands._options import Verb, option
from embedkit.errors import UserError
from embedkit.tracking.store import resolve_uri

HOST = "127.0.0.1"


@dataclass
class UiOptions:
    uri: Optional[str] = option(None, "the MLflow store; null: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db",
                                key="tracking.uri", metavar="URI")
    port: int = option(5000, "the port on 127.0.0.1", minimum=1, maximum=65535)
    workers: int = option(1, "the UI server's worker processes", minimum=1)


VERB = Verb("ui", "the MLflow UI on 127.0.0.1 over the run store", UiOptions)


def command(args: list[str]) -> list[str]:
    """The ``mlflow ui`` command line for the verb's words; UserError for a tracking server."""
    opts = VERB.parse(args)
    uri, port, workers = opts.uri, str(opts.port), str(opts.workers)
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
