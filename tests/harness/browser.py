"""A real headless Chromium for tests, driven over ``--remote-debugging-pipe``.

Why the pipe and not ``--dump-dom``: ``--dump-dom`` dumps at the load event,
before the page's script has rendered anything, and ``--virtual-time-budget``
never expires while an EventSource is open.  The DevTools protocol over the
pipe needs no extra package: JSON messages separated by NUL bytes, commands
on fd 3, answers and events on fd 4.

Chromium is started here and ended by its PID; every wait is bounded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def find_chromium() -> str | None:
    """The browser binary itself: Debian's /usr/bin/chromium is a shell launcher that
    sources /etc/chromium.d and does not keep fds 3 and 4 for the pipe."""
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class BrowserError(Exception):
    pass


class Chromium:
    def __init__(self, binary: str, user_data_dir: Path, log_path: Path):
        self.binary = binary
        self.user_data_dir = Path(user_data_dir)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._next_id = 0
        self._buf = b""
        self._to = self._from = -1

    def start(self) -> Chromium:
        cmd_r, cmd_w = os.pipe()  # we write commands, chromium reads fd 3
        out_r, out_w = os.pipe()  # chromium writes fd 4, we read
        # the child's ends above 9 first, so placing them on 3 and 4 clobbers nothing
        cmd_r, out_w = (_above_9(fd) for fd in (cmd_r, out_w))
        self._log = open(self.log_path, "ab")
        shell = f'exec 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-; exec "$@"'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, "bash", self.binary, *FLAGS,
             f"--user-data-dir={self.user_data_dir}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(cmd_r, out_w),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._to, self._from = cmd_w, out_r
        print(f"started chromium pid {self.proc.pid}")
        return self

    # -- the protocol

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer from chromium to {what}")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed the pipe during {what}\n{self.log()}")
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    # -- pages

    def open(self, url: str) -> str:
        """A new tab on ``url``; returns its session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        self.call("Page.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(session, expression)
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")

    def screenshot(self, session: str, path: Path) -> bytes:
        data = base64.b64decode(
            self.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
        Path(path).write_bytes(data)
        return data

    # -- ending

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (BrowserError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for fd in (self._to, self._from):
            if fd >= 0:
                os.close(fd)
        self._to = self._from = -1
        self._log.close()
