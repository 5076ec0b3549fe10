"""A real multi-node Ray cluster on 127.0.0.1 for tests: `ray start --head` and `ray start --address` processes of
its own (its own ports, temp dir and auth token), apart from the suite's session Ray (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's ray and mm1data scripts
# The head's address: loopback, but not 127.0.0.1. A worker node joins only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER on
# ("Multi-node Ray clusters are not supported" at 0), and then Ray rewrites 127.0.0.1 and localhost, in
# --node-ip-address and --address alike, to the host's network address; other 127.x.y.z addresses it keeps. Node i
# is 127.0.0.(2 + i).
HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Head and worker nodes as `ray start --block` children. Each is stopped by its own pid (SIGTERM: `ray start
    --block` then stops the Ray processes it started), never with `ray stop`, which stops every Ray on the machine,
    the suite's session Ray and other test runs included. Token auth is on (RAY_AUTH_MODE=token) with a token file
    of its own, as a head started where ~/.ray/auth_token exists runs it (Ray 2.60)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.temp = Path("/tmp") / f"mm1c{secrets.token_hex(3)}"  # short: Ray's socket paths must stay < 108 bytes
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """For the nodes, a driver (`mm1data run --address`) or the `ray` CLI: this cluster's token, no setting of
        the session Ray's (RAY_*) and, for a driver, its node IP on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # none of the session Ray's settings
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        return env | extra

    def start_node(self, cpus: int, gpus: int = 0, head: bool = False) -> subprocess.Popen:
        ip = f"127.0.0.{2 + len(self.nodes)}"  # see HOST
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}"]
        cmd += [f"--num-gpus={gpus}", f"--temp-dir={self.temp}", "--disable-usage-stats"]
        ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
        cmd += [f"{p}={free_port()}" for p in (*ports, "--runtime-env-agent-port")]
        if head:
            cmd += [
                "--head",
                f"--port={self.port}",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-host={HOST}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.root / f"node{len(self.nodes)}.log", "wb")
        # no 30 s drain on SIGTERM (it waits for Serve proxies; nothing here needs it)
        env = self.env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        self.wait_for(lambda: len(self.alive_nodes()) >= len(self.nodes), f"node {len(self.nodes)} to join", 90)
        return proc

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (its dashboard address, its token)."""
        cmd = [str(BIN / "ray"), *args]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def state(self, what: str, **filters: str) -> list[dict]:
        """Ray's state API (what `ray list WHAT --detail` prints: node, actor and task records with their node_id),
        asked over HTTP: the CLI would cost seconds of imports per call. [] until the dashboard answers."""
        query = [("limit", "10000"), ("detail", "1")]
        for k, v in filters.items():
            query += [("filter_keys", k), ("filter_predicates", "="), ("filter_values", v)]
        req = urllib.request.Request(
            f"{self.dashboard}/api/v0/{what}?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {self.token.read_text()}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []

    def alive_nodes(self) -> list[dict]:
        return self.state("nodes", state="ALIVE")

    def wait_for(self, ok, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for p in self.nodes:
                if p.poll() is not None:
                    raise RuntimeError(f"a ray node exited ({p.returncode}) waiting for {what}: see {self.root}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}: see {self.root}")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in reversed(self.nodes):  # workers first, then the head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.nodes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
                p.wait()
        shutil.rmtree(self.temp, ignore_errors=True)  # sessions, logs, spilled objects
