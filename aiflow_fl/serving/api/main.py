"""Running the server: ``aiflow serve`` (:func:`serve`) and :func:`launch` for scripts and tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError


def serve(cfg: AiflowConfig, family: str | None = None, members: list[str] | None = None, remote: dict[str, str] | None = None,
          model: str | None = None, exit_layer: int | None = None, host: str = "127.0.0.1", port: int = 0,
          api_key: str | None = None, ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
          remote_ca: str | None = None, tier: str | None = None, core: int | None = None, threads: int | None = None) -> None:
    """Bind, print ``READY <port>``, load the models in the background (``/health`` 503 until then), serve."""
    import torch
    import uvicorn

    from aiflow_fl.serving.api.app import create_app
    from aiflow_fl.serving.api.state import ServerState

    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise AiflowError("TLS needs both --ssl-keyfile and --ssl-certfile.")
    for path in (ssl_keyfile, ssl_certfile):
        if path is not None and not Path(path).is_file():
            raise AiflowError(f"TLS file {path} does not exist.")
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    if threads:
        torch.set_num_threads(threads)
    from aiflow_fl.serving.api.collab import check_collab_run, collab_run_for

    collab_run = collab_run_for(cfg, family) if tier is None else None
    if collab_run is not None:
        check_collab_run(cfg, collab_run)  # missing specialists, descriptions or embedding model: here, before the port opens
        if family and not any((Path(family) / sub / "family.json").is_file() for sub in ("", "family")):
            family = None  # a run with specialists and no family: serve `collab` alone
    state = ServerState(cfg, family, members, remote, model, exit_layer, api_key, remote_ca, tier, collab_run)
    family_path = None
    if family:
        from aiflow_fl.serving.api.state import family_folder

        family_path = family_folder(family)  # a bad folder fails here, before the port opens
    family_note = f" family={family_path}" if family_path else ""
    family_note += f" collab={collab_run}" if collab_run else ""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise AiflowError(f"Cannot listen on {host}:{port} ({exc.strerror}).") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    scheme = "https" if ssl_certfile else "http"
    print(f"READY {bound} {scheme}://{host}:{bound}{family_note} tier={tier or 'api'} pid={os.getpid()}", flush=True)
    state.load_in_background()
    config = uvicorn.Config(create_app(state), log_level="warning", ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
                            timeout_graceful_shutdown=2, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        state.close()


@dataclass
class Launched:
    """A server started by :func:`launch`: its process and addresses."""

    proc: subprocess.Popen
    url: str  # http(s)://host:port
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` takes."""
        return f"{self.url}/v1"


def start(args: list[str], timeout_s: float = 300.0, env: dict[str, str] | None = None, ca_file: str | None = None,
          log: str | Path | None = None) -> Launched:
    """Start ``aiflow serve ARGS`` as a child process; wait for its READY line, then for ``/health`` 200."""
    import httpx

    command = [sys.executable, "-m", "aiflow_fl.cli", "serve", *args]
    import tempfile

    # stderr to a file (a pipe nobody reads would fill up and stall the server); it explains a failed start
    stderr = open(log, "ab") if log else tempfile.TemporaryFile()  # noqa: SIM115  (the child keeps it)
    # the caller's working directory: relative family folders and files in ARGS mean what they say there
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})})

    def tail() -> str:
        stderr.flush()
        stderr.seek(0)
        return stderr.read().decode(errors="replace")[-1500:] if not log else f"(see {log})"

    deadline = time.monotonic() + timeout_s
    url = None
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    try:
        while url is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AiflowError(f"`aiflow serve {' '.join(args)}` exited with code {proc.returncode}: {tail()}")
            if selector.select(timeout=0.5):
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if line.startswith("READY"):
                    url = line.split()[2]
        if url is None:
            raise AiflowError(f"`aiflow serve {' '.join(args)}` did not open its port within {timeout_s:.0f} s.")
        verify = __import__("ssl").create_default_context(cafile=ca_file) if ca_file else True
        with httpx.Client(verify=verify, timeout=5) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AiflowError(f"`aiflow serve {' '.join(args)}` exited with code {proc.returncode}: {tail()}")
                try:
                    response = client.get(f"{url}/health")
                    if response.status_code == 200:
                        key = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--api-key"), env and env.get("AIFLOW_API_KEY"))
                        return Launched(proc, url, key)
                    if response.json().get("status") == "failed":
                        raise AiflowError(f"`aiflow serve {' '.join(args)}` failed to load: {response.json().get('detail')}")
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
        raise AiflowError(f"`aiflow serve {' '.join(args)}` was not healthy within {timeout_s:.0f} s.")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`start` (terminate, then kill)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def launch(family: str | Path, *args: str, port: int = 0, timeout_s: float = 300.0, api_key: str | None = None,
           log: str | Path | None = None) -> Iterator[Launched]:
    """Serve a family folder (or a run folder holding one) in a subprocess until the block ends::

        with launch("runs/demo-.../family") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")
            client.chat.completions.create(model="full", messages=[{"role": "user", "content": "Hi"}])

    ``args`` are more ``aiflow serve`` options or overrides (e.g. ``"serving.chains=[eesb-0>full]"``).
    """
    command = [str(family), "--port", str(port), *(["--api-key", api_key] if api_key else []), *args]
    server = start(command, timeout_s=timeout_s, log=log)
    try:
        yield server
    finally:
        stop(server.proc)
