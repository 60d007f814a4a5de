"""Start `mergesearch dashboard` as a user does, in a subprocess, for the dashboard tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(url: str, port: int, log: Path, *options: str, timeout: float = 60
                    ) -> subprocess.Popen:
    """`mergesearch dashboard --storage URL --port PORT [OPTIONS]`, its output in `log`;
    returns once the server answers on http://127.0.0.1:PORT. The caller terminates it."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, "-c", "from search.cli import main; main()", "dashboard",
             "--storage", url, "--port", str(port), *options], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.terminate()
                server.wait(timeout=10)
                raise RuntimeError(f"dashboard did not start:\n{log.read_text()}") from None
            time.sleep(0.5)
