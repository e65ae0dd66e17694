"""Start ``finetune serve`` as a background process and wait until it answers (for scripts and tests).

    with ServerProcess(gguf, ["serve.max_concurrent=8"], api_key="k") as server:
        print(server.url, server.health())
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect_address(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (the wildcards mean loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


class ServerProcess:
    def __init__(self, target: str | Path, overrides: list[str] | None = None, *, api_key: str | None = None,
                 store: str | Path | None = None, port: int | None = None, startup_timeout: float = 180.0,
                 log_path: str | Path | None = None, host: str | None = None):
        self.target = str(target)
        self.overrides = list(overrides or [])
        self.api_key = api_key
        self.store = str(store) if store else None
        self.host = host
        self.port = port or free_port(host or "127.0.0.1")
        self.url = f"http://{connect_address(host or '127.0.0.1')}:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="finetune-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "finetune", "serve", self.target, *self.overrides, "--port", str(self.port)]
        if self.host:
            cmd += ["--host", self.host]
        if self.store:
            cmd += ["--store", self.store]
        env = dict(os.environ)
        if self.api_key:
            env["FINETUNE_API_KEY"] = self.api_key  # not on the command line, where `ps` would show it
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"finetune serve exited with code {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health().get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"finetune serve did not answer within {self.startup_timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def health(self) -> dict[str, Any]:
        """/health with the key (a network server tells a caller without it only whether it is up)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers), timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()
