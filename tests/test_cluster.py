"""Running on a Ray cluster: cluster.yaml checked by Ray's validator, address pitfalls, and
`raykd submit` to a real two-node cluster with token auth whose nodes share output_dir.

The heads here are `ray start --head --block` subprocesses on loopback with their own ports and
temp dirs, stopped by their own pid (never `ray stop`, which would kill every Ray here)."""
import copy
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raykd.cli import main
from raykd.train.runner import latest_state

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAYKD, RAY = str(BIN / "raykd"), str(BIN / "ray")


# ---- cluster.yaml ---------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_validator_and_is_safe():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"]["raykd_trial"] >= 1, "sweep trial drivers need the custom resource"
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu), "an autoscaling GPU worker type"
    assert raw["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())
    assert "ray-ml" not in raw["docker"]["image"] and raw["docker"]["image"].startswith(
        "rayproject/ray:2.60")
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text and "--dashboard-host=127.0.0.1" in text, "dashboard on loopback"
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("pip install" in c and "raykd" in c for c in raw["setup_commands"])
    assert any("/mnt/raykd" in c for c in raw["initialization_commands"]), "shared storage"


# ---- addresses and bad input: errors before anything is sent --------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_address_pitfalls_are_one_line_errors(capsys, monkeypatch):
    job = str(ROOT / "jobs" / "quickstart.yaml")
    assert "give the dashboard URL with its scheme, e.g. http://127.0.0.1:8265" in \
        one_line_error(capsys, "submit", job, "--address", "127.0.0.1:8265")
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach the Ray dashboard at" in one_line_error(capsys, "submit", job,
                                                                 "--address", dead)
    assert time.monotonic() - started < 15, "an unreachable head fails fast, never hangs"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "give the cluster's dashboard address" in one_line_error(capsys, "submit", job)
    assert "unknown key student.foo" in one_line_error(
        capsys, "submit", job, "student.foo=1", "--address", dead)   # checked before sending
    assert "give a job file to submit" in one_line_error(capsys, "submit", "--address", dead)


# ---- a real head ------------------------------------------------------------------------------

class Head:
    """`ray start --head --block` on loopback, optionally with token auth; a worker node may join."""

    def __init__(self, tmp: Path, token: str | None, cpus: int = 2, resources: str = "{}",
                 multi_node: bool = False):
        self.port, self.dash = free_port(), free_port()
        self.temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")   # short: socket paths are limited
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                    "RAY_AUTH_MODE": "token" if token else "disabled", "HOME": str(tmp)}
        self.env.pop("RAY_ADDRESS", None)
        # Ray refuses to let a second raylet join unless this is 1 (its loopback-only mode is 0)
        self.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1" if multi_node else "0"
        if token:
            self.env["RAY_AUTH_TOKEN"] = token
        self.procs = [self._start(["--head", f"--port={self.port}", f"--num-cpus={cpus}",
                                   f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
                                   "--include-dashboard=true", f"--temp-dir={self.temp}",
                                   f"--resources={resources}"], tmp / "head.log")]
        self.url = f"http://127.0.0.1:{self.dash}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.dash), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the test head did not start: " + (tmp / "head.log").read_text()[-2000:])

    def _start(self, args, log: Path):
        # every fixed default port of a node's agents taken fresh, so a head started here never
        # collides with another Ray on this machine (its dashboard agent on 52365 would leave
        # the head with no job agent: "No available agent to submit job")
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "ray-client-server-port")]
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *ports, *args],
                                env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def add_node(self, tmp: Path, cpus: int, resources: str) -> str:
        """Start a second node; return its node ID once the head lists it as alive."""
        # its own temp dir, as on a machine of its own: nodes sharing one would share the
        # runtime-env packages too, and one node's clean-up would delete the other's
        temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
        self.procs.append(self._start([f"--address=127.0.0.1:{self.port}", f"--num-cpus={cpus}",
                                       f"--resources={resources}", f"--temp-dir={temp}"],
                                      tmp / "node.log"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            listed = subprocess.run(
                [sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:%d', "
                 "log_to_driver=False); print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] "
                 "and 'node:__internal_head__' not in n['Resources']])" % self.port],
                env=self.env, capture_output=True, text=True, timeout=60)
            joined = listed.stdout.split()
            if joined:
                return joined[-1]
            time.sleep(1)
        raise AssertionError("the second node did not join: " + (tmp / "node.log").read_text()[-2000:])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            os.killpg(proc.pid, signal.SIGTERM)   # its handler stops its own children
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


MY_MODELS = """from torch import nn


def small(num_classes, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, num_classes))
"""


def test_a_factory_outside_the_project_folder_fails_before_anything_is_sent(
        tmp_path, capsys, monkeypatch, digits_teacher):
    """The cluster receives the project folder only: a factory module elsewhere (here the
    tests' own folder) would not import there, so `raykd submit` says so in one line."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    job = tiny_job(project / "own.yaml", tmp_path / "out", digits_teacher,
                   student={"model": "byo_factory:tiny_net"})
    err = one_line_error(capsys, "submit", job.name, "--address",
                         f"http://127.0.0.1:{free_port()}")
    assert "byo_factory:tiny_net: its module" in err and "outside the project folder" in err


def tiny_job(path: Path, out: Path, teacher: Path, name: str = "tiny", **extra) -> Path:
    job = {"name": name, "output_dir": str(out), "seeds": [0],
           "data": {"dataset": "digits", "batch_size": 64},
           "teacher": {"checkpoint": str(teacher)},
           "student": {"model": "cnn_small", "train": {"epochs": 1, "lr": 0.1}},
           "methods": {"kd": {}}, "ray": {"workers": 1, "max_failures": 0}, **extra}
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.ray
def test_a_two_node_cluster_with_token_auth_takes_submitted_jobs_and_shares_output_dir(
        tmp_path, digits_teacher):
    """One real cluster (a head and a second node, token auth on): `raykd submit` from a client
    without Ray's token setup; the submitted job's unit is placed on the second node by a custom
    resource, so the job's driver (on the head) and its worker share output_dir."""
    token = secrets.token_hex(16)
    head = Head(tmp_path, token, cpus=1, multi_node=True)
    try:
        second = head.add_node(tmp_path, 2, '{"second_node": 2}')
        submit_flow(tmp_path, head, token, digits_teacher, second)
    finally:
        head.stop()


def submit_flow(tmp_path: Path, head: Head, token: str, digits_teacher: Path,
                second_node: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    # the student is the user's own model, from a module in the project folder only: it reaches
    # the cluster's driver and the second node's worker through the job's working_dir
    (project / "my_models.py").write_text(MY_MODELS)
    out = tmp_path / "cluster_out"
    job = tiny_job(project / "tiny.yaml", out, digits_teacher,
                   student={"model": "my_models:small", "train": {"epochs": 1, "lr": 0.1}},
                   ray={"workers": 1, "max_failures": 0,
                        "resources_per_worker": {"second_node": 1}})
    client_env = {**os.environ, "HOME": str(tmp_path / "client"), "RAY_AUTH_MODE": "disabled"}
    client_env.pop("RAY_AUTH_TOKEN", None)
    # no token: refused, one line, nothing submitted
    refused = subprocess.run([RAYKD, "submit", job.name, "--address", head.url],
                             cwd=project, env=client_env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "refused the request" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    # the token from a file; RAY_ADDRESS pointing elsewhere does not override the flag
    (tmp_path / "token").write_text(token)
    local = tmp_path / "local"
    ok = subprocess.run(
        [RAYKD, "submit", job.name, "--address", head.url, "--token-file",
         str(tmp_path / "token"), "--results-dir", str(local)], cwd=project,
        env={**client_env, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"},
        capture_output=True, text=True, timeout=400)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "submitted raysubmit_" in ok.stdout and "SUCCEEDED" in ok.stdout
    assert "seed0-kd" in ok.stdout, "the job's log is streamed"
    assert "RAYKD-RESULTS" not in ok.stdout, "the results block is not shown"
    assert "shared storage: all 2 nodes read and write" in ok.stdout
    rows = pd.read_parquet(local / "tiny" / "results.parquet")
    assert list(rows.method) == ["kd"] and 0 <= rows.test_top1[0] <= 1
    assert list(rows.model) == ["my_models:small"]
    assert rows.node[0] == second_node, "the unit ran on the node with the resource"
    # its export and checkpoint are where the driver, on the other node, looks for them
    assert Path(rows.export[0]).is_file()
    assert latest_state(str(out / "tiny" / "ray"), "seed0-kd")
    # a job that fails on the cluster (its data is absent there): non-zero, status named
    bad = tiny_job(project / "bad.yaml", tmp_path / "cluster_out", digits_teacher,
                   data={"dataset": "cifar10", "root": str(tmp_path / "no_cifar")})
    failed = subprocess.run(
        [RAYKD, "submit", bad.name, "--address", head.url, "--token-file",
         str(tmp_path / "token"), "--results-dir", str(local)], cwd=project,
        env=client_env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout[-2000:]
    # --no-wait prints the id and returns; --stop stops it; --follow then reports STOPPED
    auth = ["--address", head.url, "--token-file", str(tmp_path / "token")]
    slow = tiny_job(project / "slow.yaml", tmp_path / "cluster_out", digits_teacher,
                    name="slow", student={"model": "cnn_small",
                                          "train": {"epochs": 200, "lr": 0.1}})
    queued = subprocess.run([RAYKD, "submit", slow.name, "--no-wait", *auth], cwd=project,
                            env=client_env, capture_output=True, text=True, timeout=120)
    assert queued.returncode == 0, queued.stderr[-2000:]
    job_id = queued.stdout.split("submitted ", 1)[1].split()[0]
    assert f"raykd submit --follow {job_id}" in queued.stdout
    stop = subprocess.run([RAYKD, "submit", "--stop", job_id, *auth], cwd=project,
                          env=client_env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and f"stop {job_id}" in stop.stdout, stop.stderr[-2000:]
    follow = subprocess.run([RAYKD, "submit", "--follow", job_id, *auth, "--results-dir",
                             str(local)], cwd=project, env=client_env, capture_output=True,
                            text=True, timeout=300)
    assert follow.returncode == 1 and f"job {job_id}: STOPPED" in follow.stdout, \
        follow.stdout[-2000:]
