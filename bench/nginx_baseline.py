"""nginx as a second baseline for the proxy benchmarks: what a mature C proxy costs
the same stream on the same machine, in the same run.

Configured as a streaming reverse proxy should be for SSE: ``proxy_buffering
off`` (each chunk leaves as it arrives), HTTP/1.1 keep-alive to the upstream,
one worker process (meshd's API is one process too), no access log. It runs
in the foreground under its own prefix directory, is stopped by its PID, and
touches nothing of the system's nginx (Debian's ``nginx-light`` package
provides the binary).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def on_cpus(cpus: set[int] | None):
    """A ``preexec_fn`` that confines the child (and what it forks) to ``cpus``; None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Nginx:
    """One nginx in front of ``upstream_port``, listening on ``listen_port``."""

    def __init__(self, upstream_port: int, listen_port: int, cpus: set[int] | None = None):
        self.upstream_port = upstream_port
        self.port = listen_port
        self.cpus = cpus  # run on these CPUs only (``--pin``); its workers inherit them
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def start(self, wait_port) -> None:
        binary = nginx_binary()
        if binary is None:
            raise SystemExit("nginx is not installed (Debian: apt-get install nginx-light)")
        self._dir = tempfile.TemporaryDirectory(prefix="bench-nginx-")
        prefix = Path(self._dir.name)
        conf = prefix / "nginx.conf"
        conf.write_text(CONF.format(prefix=prefix, upstream=self.upstream_port, listen=self.port))
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=on_cpus(self.cpus))
        print(f"  started pid {self.proc.pid}: nginx -> 127.0.0.1:{self.upstream_port}",
              file=sys.stderr)
        wait_port(self.port)

    def pids(self) -> list[int]:
        """The master and its workers (the workers do the proxying)."""
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            workers = [int(p) for p in children.read_text().split()]
        except OSError:
            workers = []
        return [self.proc.pid, *workers]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown, workers with it
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
