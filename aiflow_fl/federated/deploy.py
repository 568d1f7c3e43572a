"""``aiflow deploy``: the same ServerApp and ClientApp under real Flower processes on loopback.

What it runs (each a separate OS process in its own session, so it and its children can be stopped
together by process group), secure by default (``aiflow_fl/federated/security.py``):

* ``flower-superlink --ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY --enable-supernode-auth
  --disable-runtime-dependency-installation --port P`` — Fleet, Control and Runtime APIs on one port,
  over TLS (certificates generated for the run, or the user's), admitting only registered SuperNodes;
* per device, a key pair whose public key is registered with ``flwr supernode register KEY.pub deploy``,
  then ``flower-supernode --root-certificates CA --auth-supernode-private-key KEY --superlink
  127.0.0.1:P --port Q_i --node-config "partition-id=i num-partitions=N member='…' lora-rank=r
  edge-id=e"`` — its profile as node config;
* ``flwr run . deploy --run-config FILE --format json`` with the connection ``deploy`` written to
  ``$FLWR_HOME/config.toml`` (``root-certificates = CA``); the run is then polled with ``flwr ls
  deploy --run-id ID --format json`` until its status is ``finished:*`` (``flwr run --stream`` exits 0
  even when the ServerApp failed).

``secure=False`` (``aiflow deploy --insecure``) runs everything with ``--insecure``: plaintext links and
no node authentication, for local tests only; it says so when it starts.

The same steps by hand are in the README. Everything is stopped in ``finally`` (SIGTERM to each
process group, SIGKILL after a grace period), also when the run fails or times out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_fl.config import AiflowConfig, flatten
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.device import device_profile
from aiflow_fl.federated.security import NodeKey, TlsFiles, make_node_key, make_tls

APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml with [tool.flwr.app]
CONNECTION = "deploy"
INSECURE_NOTICE = ("INSECURE deployment: links are plaintext and any SuperNode may join (--insecure); "
                   "for local tests only. Leave out --insecure for TLS and SuperNode authentication.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (PATH may not hold the venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of the Flower processes: their FLWR_HOME, no runtime dependency installation, and
    this interpreter's bin folder first on PATH (the SuperLink starts ``flower-superexec`` by name, so a
    venv that is not activated would otherwise not be found)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_config_overrides(cfg: AiflowConfig) -> dict[str, Any]:
    """The config as Flower run-config overrides: only keys the app's pyproject declares."""
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {k: v for k, v in flatten(cfg).items() if k in declared and v is not None}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def node_config_string(node: dict[str, Any]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in node.items())


def node_configs(cfg: AiflowConfig, num_nodes: int, extra: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each device's node config: its partition and the profile the config gives it."""
    out = []
    for i in range(num_nodes):
        node: dict[str, Any] = {"partition-id": i, "num-partitions": num_nodes}
        node.update((extra or {}).get(i, {}))
        p = device_profile(node, cfg)
        node.update({"member": p.member, "lora-rank": p.lora_rank, "edge-id": p.edge_id})
        out.append(node)
    return out


@dataclass
class Deployment:
    """Running SuperLink and SuperNodes; stop() ends them (and their children) by process group."""

    workdir: Path
    flwr_home: Path
    port: int
    superlink: subprocess.Popen
    supernodes: list[subprocess.Popen] = field(default_factory=list)
    tls: TlsFiles | None = None  # None: --insecure
    supernode_auth: bool = False
    node_keys: list[NodeKey] = field(default_factory=list)

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [self.superlink, *self.supernodes]

    @property
    def secure(self) -> bool:
        return self.tls is not None

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], cwd=APP_DIR, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def register(self, key: NodeKey) -> None:
        """Put a SuperNode's public key on the SuperLink's list of allowed nodes (Control API)."""
        done = self.flwr("supernode", "register", str(key.public), CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise AiflowError(f"`flwr supernode register {key.public}` failed: {(done.stdout + done.stderr)[-1500:]}")

    def start_supernode(self, node: dict[str, Any], log_name: str, key: NodeKey | None = None,
                        insecure: bool | None = None, extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start one SuperNode with ``node`` as its node config. By default it connects as the
        deployment does (TLS with the run's CA, ``key`` for authentication); ``insecure=True``
        connects in plaintext whatever the SuperLink does (tests use it to see it refused)."""
        plain = (not self.secure) if insecure is None else insecure
        cmd = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", node_config_string(node)]
        if plain:
            cmd.insert(1, "--insecure")
        else:
            assert self.tls is not None
            cmd[1:1] = ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private)]
        cmd += list(extra_args)
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env(), stdout=open(self.workdir / "logs" / log_name, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.supernodes.append(proc)
        return proc

    def stop(self, grace_s: float = 6.0) -> None:
        for proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes:
            _signal_group(proc, signal.SIGKILL)  # the group: flwr-serverapp / flwr-clientapp children too
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10.0
        while any(group_members(p.pid) for p in self.processes) and time.monotonic() < deadline:
            time.sleep(0.2)  # orphaned app processes die asynchronously after SIGKILL

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AiflowError(f"flower-superlink exited with code {proc.returncode} at start-up; its log: {log}\n"
                              + log.read_text(errors="replace")[-2000:])
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AiflowError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f} s; its log: {log}")


def connection_toml(port: int, tls: TlsFiles | None) -> str:
    """The ``flwr`` CLI's connection to this SuperLink (``$FLWR_HOME/config.toml``)."""
    head = f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
    if tls is None:
        return head + "insecure = true\n"
    return head + f"root-certificates = {json.dumps(str(tls.ca_cert))}\n"


def superlink_command(port: int, database: Path, tls: TlsFiles | None, supernode_auth: bool) -> list[str]:
    cmd = [_bin("flower-superlink"), "--disable-runtime-dependency-installation", "--port", str(port), "--database", str(database)]
    if tls is None:
        return [*cmd, "--insecure"]
    cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    return [*cmd, "--enable-supernode-auth"] if supernode_auth else cmd


def start(cfg: AiflowConfig, num_nodes: int, workdir: str | Path | None = None,
          extra_node_config: dict[int, dict[str, Any]] | None = None, secure: bool = True,
          tls: TlsFiles | None = None, supernode_auth: bool = True) -> Deployment:
    """Start a SuperLink and ``num_nodes`` SuperNodes on loopback (logs under ``workdir/logs``).

    ``secure``: TLS (``tls``, or certificates generated under ``workdir/tls``) and, with
    ``supernode_auth``, one key pair per SuperNode (``workdir/keys``) registered before it starts.
    """
    if num_nodes < 1:
        raise AiflowError(f"Number of SuperNodes is {num_nodes}; it must be >= 1.")
    if not secure and tls is not None:
        raise AiflowError("TLS files were given together with --insecure; give one or the other.")
    work = Path(workdir or tempfile.mkdtemp(prefix="aiflow-deploy-")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    if secure:
        tls = tls.check() if tls is not None else make_tls(work / "tls")
    port = free_port()
    (flwr_home / "config.toml").write_text(connection_toml(port, tls))
    env = flower_env(flwr_home)
    log = work / "logs" / "superlink.log"
    superlink = subprocess.Popen(superlink_command(port, work / "superlink.db", tls, secure and supernode_auth),
                                 cwd=work, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deployment = Deployment(work, flwr_home, port, superlink, tls=tls, supernode_auth=secure and supernode_auth)
    try:
        _wait_port(port, superlink, log)
        for i, node in enumerate(node_configs(cfg, num_nodes, extra_node_config)):
            key = None
            if deployment.supernode_auth:
                key = make_node_key(work / "keys", f"supernode-{i}")
                deployment.register(key)
                deployment.node_keys.append(key)
            deployment.start_supernode(node, f"supernode-{i}.log", key)
    except BaseException:
        deployment.stop()
        raise
    return deployment


@dataclass
class DeployResult:
    run_id: int
    status: str
    run_dir: Path
    logs: str


def run(deployment: Deployment, cfg: AiflowConfig, timeout_s: float = 1800.0, on_poll: Any = None) -> DeployResult:
    """Submit this app to the deployment with ``flwr run`` and wait until the run finishes."""
    overrides = deployment.workdir / "run-config.toml"
    overrides.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config_overrides(cfg).items()))
    submitted = deployment.flwr("run", ".", CONNECTION, "--run-config", str(overrides), "--format", "json")
    try:
        run_id = int(json.loads(submitted.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise AiflowError(f"`flwr run` did not start a run: {(submitted.stdout + submitted.stderr)[-1500:]}") from None
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        listed = deployment.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            status = str(json.loads(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            status = ""
        if status.startswith("finished"):
            break
        if on_poll is not None:
            on_poll()
        time.sleep(1.0)
    logs = deployment.flwr("log", str(run_id), CONNECTION, "--show").stdout
    if not status.startswith("finished"):
        raise AiflowError(f"Run {run_id} did not finish within {timeout_s:.0f} s (status '{status}'). Logs:\n{logs[-2000:]}")
    return DeployResult(run_id, status, Path(cfg.run.dir), logs)


def deploy_command(overrides: list[str], nodes: int = 0, timeout_s: float = 3600.0, insecure: bool = False,
                   tls: TlsFiles | None = None, supernode_auth: bool = True) -> dict[str, Any]:
    """The body of ``aiflow deploy``: start SuperLink + SuperNodes, run, summarize, stop everything."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from aiflow_fl.progress import progress_bar

    from aiflow_fl.federated.run import RunFolder, config_for, print_summary, resolve_run_dir, summarize

    from aiflow_fl.federated.preflight import check_before_start

    cfg = config_for(overrides)
    check_before_start(cfg)  # data, members, run folder: refused before any Flower process starts
    run_dir = resolve_run_dir(cfg)
    num_nodes = nodes or cfg.federation.num_devices
    folder = RunFolder(run_dir)
    with progress_bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("held-out loss {task.fields[loss]}"), TimeElapsedColumn()) as progress:
        task = progress.add_task(f"deploy: {num_nodes} SuperNodes, rounds", total=cfg.federation.rounds, loss="-")

        def on_poll() -> None:
            evals = folder.records("eval")
            if evals:
                progress.update(task, completed=int(evals[-1]["round"]), loss=f"{evals[-1]['eval-loss']:.3f}")

        if insecure:
            progress.console.print(f"[bold red]{INSECURE_NOTICE}[/]")
        with start(cfg, num_nodes, run_dir.parent / f".{run_dir.name}.deploy", secure=not insecure, tls=tls,
                   supernode_auth=supernode_auth) as deployment:
            security = "insecure (plaintext, no node authentication)" if not deployment.secure else (
                f"TLS (CA {deployment.tls.ca_cert})" + (", SuperNode authentication: "
                f"{len(deployment.node_keys)} registered keys" if deployment.supernode_auth else ", no SuperNode authentication"))
            progress.console.print(f"SuperLink on 127.0.0.1:{deployment.port}, {num_nodes} SuperNodes, {security}; "
                                   f"logs in {deployment.workdir / 'logs'}")
            result = run(deployment, cfg, timeout_s, on_poll)
        on_poll()
    if result.status != "finished:completed":
        raise AiflowError(f"Run {result.run_id} ended with status '{result.status}'. Last log lines:\n{result.logs[-2000:]}")
    return print_summary(summarize(run_dir) | {"run_id": result.run_id, "status": result.status},
                         f"federated deployment ({cfg.strategy}, {num_nodes} SuperNodes)")
