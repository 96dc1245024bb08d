"""``iconreg app``: a small HTTP front door that gives every browser tab its own session process.

trame shares one state among all the browsers connected to a server, so two tabs of one server would see and
overwrite each other's registration. Instead, each request of ``/`` starts a session process
(:mod:`.app`: its own MRML scene, engine and files) on a free port of the same host and redirects the tab to
it. A session stops by itself a while after its tab closed, and all of them stop with the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SESSION_START_TIMEOUT_S = 120.0


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _stop_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when the launcher dies
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    """Starts one :mod:`.app` process per page load (at most ``max_sessions`` alive)."""

    def __init__(self, host: str, session_args: list[str], *, max_sessions: int = 4, idle_timeout: int = 60):
        self.host = host
        self.session_args = session_args
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.sessions: list[subprocess.Popen] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="iconreg-app-logs-"))

    def alive(self) -> list[subprocess.Popen]:
        self.sessions = [process for process in self.sessions if process.poll() is None]
        return self.sessions

    def start_session(self) -> int:
        """Start a session process and wait until it accepts connections; returns its port."""
        if len(self.alive()) >= self.max_sessions:
            raise UserError(f"{self.max_sessions} sessions are open, the most this app serves at once; close a tab "
                            "(its session stops a minute later) and reload.")
        port = free_port(self.host)
        log = open(self.log_dir / f"session-{port}.log", "wb")
        command = [sys.executable, "-m", "ICONRegistrationLib.webapp.app", "--host", self.host, "--port", str(port),
                   "--idle-timeout", str(self.idle_timeout), *self.session_args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        self.sessions.append(process)
        deadline = time.monotonic() + SESSION_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (self.log_dir / f"session-{port}.log").read_text(encoding="utf-8", errors="replace")[-2000:]
                raise UserError(f"The session process stopped while starting (exit {process.returncode}):\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.5):
                return port
            time.sleep(0.2)
        process.terminate()
        raise UserError(f"The session process did not start within {SESSION_START_TIMEOUT_S:.0f} s.")

    def stop_all(self) -> None:
        for process in self.alive():
            process.terminate()
        for process in self.sessions:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()


def _page(title: str, text: str) -> str:
    import html

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family: sans-serif; margin: 3em'><h2>{html.escape(title)}</h2>"
            f"<pre style='white-space: pre-wrap'>{html.escape(text)}</pre></body></html>")


def run(host: str = "127.0.0.1", port: int = 8080, *, data_dir: Optional[str] = None, fixed: Optional[str] = None,
        moving: Optional[str] = None, max_upload_mb: float = 512, max_sessions: int = 4,
        idle_timeout: int = 60) -> None:
    """Serve ``http://host:port/`` until interrupted (Ctrl+C or SIGTERM); sessions stop with it."""
    from aiohttp import web

    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"The data folder '{data_dir}' does not exist.")
    for role, path in (("fixed", fixed), ("moving", moving)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"The {role} image '{path}' does not exist.")
    if (fixed is None) != (moving is None):
        raise UserError("Give both --fixed and --moving, or neither.")
    args: list[str] = ["--max-upload-mb", str(max_upload_mb)]
    if data_dir is not None:
        args += ["--data-dir", str(Path(data_dir).resolve())]
    if fixed is not None:
        args += ["--fixed", str(Path(fixed).resolve()), "--moving", str(Path(moving).resolve())]
    launcher = Launcher(host, args, max_sessions=max_sessions, idle_timeout=idle_timeout)

    async def index(request: web.Request) -> web.StreamResponse:
        try:
            session_port = await asyncio.get_running_loop().run_in_executor(None, launcher.start_session)
        except UserError as error:
            return web.Response(status=503, text=_page("ICONRegistration: no session", str(error)),
                                content_type="text/html")
        target_host = request.url.host or host
        if ":" in target_host:
            target_host = f"[{target_host}]"
        raise web.HTTPFound(f"http://{target_host}:{session_port}/")

    app = web.Application()
    app.router.add_get("/", index)
    if port == 0:
        port = free_port(host)
    where = "loopback only: other machines cannot connect (use --host 0.0.0.0 to allow them)" \
        if host in LOOPBACK else f"on {host}: every machine that can reach this host can use the app"
    print(f"ICONRegistration app: http://{host if ':' not in host else f'[{host}]'}:{port}/ ({where}). "
          "Each browser tab gets its own session. Press Ctrl+C to stop.", flush=True)
    try:
        web.run_app(app, host=host, port=port, print=None, handle_signals=True)
    finally:
        launcher.stop_all()
        with contextlib.suppress(OSError):
            for log in launcher.log_dir.iterdir():
                log.unlink()
            launcher.log_dir.rmdir()
