"""The local Ray instance a driver starts when it joins no cluster: a head node on loopback whose
every service listens on a port free at start-up.

`ray.init()` starting a local instance takes Ray's fixed default for the dashboard agent's HTTP
port (52365) and offers no public setting for it, so while a `raykd run` trains, a head started
beside it (`ray start --head`, as the README's cluster section does) cannot start its job agent
and refuses every submission. `ray start --head` takes every port as an option, so raykd starts
its local instance that way (`--block`: the head lives as one child process) and joins it. The
head ends with the driver however the driver ends: at exit (after the driver disconnects,
every process under the head is killed at once), and on Linux through the parent-death signal
when the driver is killed outright. It ignores Ctrl-C, which in a terminal reaches the driver's
whole process group: the driver stops cleanly, then stops the head. Its sessions and logs are
under TEMP_DIR (`/tmp/raykd-ray-UID`), not /tmp/ray.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raykd.errors import RaykdError

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
TRIAL_SLOTS = 16       # `raykd_trial` slots sweep trial drivers take instead of a CPU
TEMP_DIR = os.path.join(tempfile.gettempdir(), f"raykd-ray-{os.getuid()}")   # not /tmp/ray


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together, so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _prepare_head() -> None:
    """In the head's process, before it runs. Ctrl-C ignored: in a terminal it reaches the
    driver's whole process group, and the driver, not the head under it, decides what stops
    (the head and the Ray processes it starts inherit the ignored SIGINT, as Ray's processes
    under an in-process `ray.init` never acted on it). And on Linux SIGTERM when the driver
    dies, which Ray's head handles by stopping every process it started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def head_command(num_cpus: int | None, ports: list[int]) -> list[str]:
    gcs, dashboard, agent, client = ports
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray if os.path.exists(ray) else "ray", "start", "--head", "--block",
               f"--node-ip-address={HOST}", f"--port={gcs}", f"--dashboard-host={HOST}",
               f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               f"--ray-client-server-port={client}", "--include-dashboard=true",
               "--disable-usage-stats", f'--resources={{"raykd_trial": {TRIAL_SLOTS}}}']
    # Ray's files (sessions, logs, sockets) in a folder of raykd's own: `ray start` records the
    # head's address as "the current cluster" in its temp folder, and a plain `ray.init()` on
    # this machine (a user's notebook, another tool) would otherwise join raykd's instance, or
    # after it ends, fail on the address it left
    command.append(f"--temp-dir={TEMP_DIR}")
    return command + ([f"--num-cpus={num_cpus}"] if num_cpus is not None else [])


class LocalHead:
    """A `ray start --head --block` child process on loopback; `address` is its GCS."""

    def __init__(self, num_cpus: int | None):
        ports = free_ports(4)
        self.address = f"{HOST}:{ports[0]}"
        self.dashboard = f"{HOST}:{ports[1]}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="raykd-ray-head-", suffix=".log",
                                               delete=False)
        self.process = subprocess.Popen(
            head_command(num_cpus, ports), stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_prepare_head)
        atexit.register(self.at_exit)
        self.wait_for_gcs(ports[0])

    def wait_for_gcs(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RaykdError(f"the local Ray instance did not start (`ray start` exited "
                                 f"{self.process.returncode}): {self.tail()}")
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RaykdError(f"the local Ray instance did not start within {START_TIMEOUT_S:.0f} s; "
                         f"its log: {self.log.name}")

    def tail(self) -> str:
        self.log.flush()
        lines = [x for x in Path(self.log.name).read_text().splitlines() if x.strip()]
        return lines[-1][:300] if lines else f"no output (log: {self.log.name})"

    def at_exit(self) -> None:
        """The driver disconnects first (Ray registered its own exit handler at import, so it
        would run after this one), then the head stops."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.stop()

    def stop(self) -> None:
        """Stop the head and every process under it at once: the driver has disconnected and
        written everything, and Ray's own graceful stop (SIGTERM) waited on the instance's
        workers for 30 s and more. Without /proc (not Linux), the graceful stop."""
        if self.process.poll() is None:
            if not os.path.isdir("/proc/self"):
                self.process.terminate()
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            else:
                family = descendants(self.process.pid)
                for pid in [self.process.pid, *family]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:      # gone already
                        pass
            self.process.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children, theirs, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found
