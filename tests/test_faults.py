"""Real faults injected into running jobs: a packed Ray Train worker SIGKILLed mid-epoch, the `raykd run`
driver SIGKILLed mid-job, and a run failing through the command (its dependants not run)."""
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from raykd.cli import main
from raykd.driver.pipeline import run_job
from raykd.files import torch_load
from raykd.job.config import job_from_dict

from conftest import all_cpus_free, small_job

RAYKD = str(Path(sys.executable).parent / "raykd")


def slow_job(tmp_path, teacher, name, **sections):
    """digits in batches of 4 (about half a second per epoch), so a kill lands inside one."""
    job = small_job(tmp_path, name=name, methods={"ce": {}},
                    data={"dataset": "digits", "batch_size": 4},
                    student={"model": "cnn_small", "train": {"epochs": 6, "lr": 0.01}},
                    ray={"workers": 1, "max_failures": 1})
    job["teacher"] = {"checkpoint": str(teacher)}
    job.update(sections)
    return job


def epochs_done(history: Path) -> int:
    if not history.is_file():
        return 0
    return max([json.loads(line)["epoch"] for line in history.read_text().splitlines()] or [0])


def kill_training_workers_when(done, killed: list) -> threading.Thread:
    """A thread that SIGKILLs every live Ray Train worker once `done()` is true."""
    import ray
    from ray.util.state import list_actors

    def run():
        deadline = time.monotonic() + 300
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        # this session's Ray by its address: another Ray on the machine would make the state
        # API's own lookup fail ("Found multiple active Ray instances")
        for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", "RayTrainWorker"),
                                          ("state", "=", "ALIVE")]):
            os.kill(actor.pid, signal.SIGKILL)
            killed.append(actor.pid)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_packed_lane_killed_mid_epoch_resumes_each_unit_to_bit_identical_weights(
        ray_session, tmp_path, digits_teacher):
    """Two units packed in one lane (one worker trains them one after the other); the worker is
    SIGKILLed mid-epoch once the second unit has reported its third. The pack restarts: the
    finished first unit is not trained again, the second resumes from its own last checkpoint to
    the same weights as an unpacked, uninterrupted run (a lone unit with packing on is a pack of
    one: the same path). The training images are augmented (random crops and flips), so the
    resumed epochs must replay their random views exactly."""
    augmented = {"dataset": "byo_data:augmented_digits", "batch_size": 4}
    plain = run_job(job_from_dict(slow_job(tmp_path, digits_teacher, "alone", data=augmented,
                                           methods={"ce2": {"method": "ce"}})))
    spec = job_from_dict(slow_job(tmp_path, digits_teacher, "lane", data=augmented,
                                  methods={"ce": {}, "ce2": {"method": "ce"}},
                                  ray={"workers": 1, "max_failures": 1, "max_parallel": 1}))
    metrics = spec.run_dir / "metrics"
    killed: list = []
    killer = kill_training_workers_when(lambda: epochs_done(metrics / "seed0-ce2.jsonl") >= 3,
                                        killed)
    rows = run_job(spec).set_index("unit")
    killer.join()
    assert killed, "no training worker was found to kill"
    assert (rows.packed == 2).all(), "both units shared one run"
    first = [json.loads(line)["epoch"] for line in
             (metrics / "seed0-ce.jsonl").read_text().splitlines()]
    assert first == list(range(1, 7)), "the finished unit was not trained again"
    second = rows.loc["seed0-ce2"]
    assert second.resumed_from >= 2 and second.epochs == 6
    a = torch_load(plain.export.iloc[0])["state_dict"]
    b = torch_load(second.export)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:   # model, optimizer state, scheduler and batch order all came back exactly
        assert torch.equal(a[name], b[name]), name


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def listening_addresses(pids: set[int]) -> dict[tuple[str, int], str]:
    """{(address, port): process} for every TCP socket these processes listen on (from /proc,
    as `ss -ltnp` reads it)."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":                  # LISTEN
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)        # each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                listening[fields[9]] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    out = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:60]
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
            if inode in listening:
                out[listening[inode]] = name
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_driver_leaves_nothing_running_and_the_rerun_finishes(ray_session, tmp_path,
                                                                      digits_teacher):
    """The killed `raykd run` starts a Ray instance of its own (the kill takes it down too), and
    while it trains, every socket its processes listen on is on loopback; the rerun joins the
    session's, as a second machine's rerun would join its cluster."""
    job = slow_job(tmp_path, digits_teacher, "driver", methods={"ce": {}, "kd": {}})
    job["teacher"] = {"model": "cnn", "train": {"epochs": 2, "lr": 0.1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "driver"
    # as a user starts it: no RAY_ADDRESS, and none of the settings the test session made
    own_ray = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    driver = subprocess.Popen([RAYKD, "run", str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, env=own_ray)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and epochs_done(run_dir / "metrics" / "seed0-kd.jsonl") < 2:
        time.sleep(0.1)    # the student that needs the teacher is past a checkpoint
    family = descendants(driver.pid)
    listening = listening_addresses(family | {driver.pid})
    os.killpg(driver.pid, signal.SIGKILL)     # the driver and every process it started
    driver.wait()
    finished = pd.read_parquet(run_dir / "results.parquet")
    assert "seed0-teacher" in set(finished.unit) and "seed0-kd" not in set(finished.unit)
    # GCS, raylet, dashboard and its agents, the driver, the Train workers: all on loopback
    assert len(listening) >= 8, listening
    exposed = {f"{ip}:{port}": name for (ip, port), name in listening.items()
               if not is_loopback(ip)}
    assert not exposed, f"the local Ray instance listens beyond loopback: {exposed}"
    deadline = time.monotonic() + 30   # Ray's workers notice their raylet is gone, and exit
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {p: Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:100]
            for p in family if alive(p)}
    assert not left, f"processes of the killed job still running: {left}"
    started = time.monotonic()
    rerun = subprocess.run([RAYKD, "run", str(path)], capture_output=True, text=True, timeout=400,
                           env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context()
                                .gcs_address})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert time.monotonic() - started < 300
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(rows.unit) == ["seed0-ce", "seed0-kd", "seed0-teacher"], "one row per unit"
    for row in finished.itertuples():   # finished before the kill: not trained again
        assert rows[rows.unit == row.unit].wall_s.iloc[0] == row.wall_s, row.unit
    # the interrupted student resumed: no epoch before its last checkpoint ran twice (its worker
    # may outlive the driver by a moment and reach a later checkpoint, never an earlier one)
    epochs = [json.loads(line)["epoch"] for line in
              (run_dir / "metrics" / "seed0-kd.jsonl").read_text().splitlines()]
    assert sorted(set(epochs)) == list(range(1, 7)) and len(epochs) <= 7, epochs


def test_a_local_instance_listens_on_free_loopback_ports_and_ends_with_its_driver():
    """The local instance a driver starts (raykd.cluster.local_head) takes none of Ray's fixed default
    ports, so a head started beside it (`ray start --head`) gets its own; every service of it
    listens on loopback; the ports are the ones it chose; a driver killed outright takes it
    down (the parent-death signal), and one that ends normally stops it at exit, leaving no
    process behind either way."""
    script = ("import time\nfrom raykd.cluster.local_head import LocalHead\nhead = LocalHead(1)\n"
              "print(head.address, head.dashboard, head.process.pid, flush=True)\n"
              "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        gcs, dashboard, head = driver.stdout.readline().split()
        deadline = time.monotonic() + 60   # the raylet and the agents come up after the GCS
        listening: dict = {}
        while time.monotonic() < deadline and not any(
                "DashboardA" in name for name in listening.values()):
            time.sleep(0.5)
            listening = listening_addresses(descendants(int(head)) | {int(head)})
        family = descendants(driver.pid)
        ports = {port for _, port in listening}
        assert {int(gcs.rsplit(":", 1)[1]), int(dashboard.rsplit(":", 1)[1])} <= ports
        # Ray's fixed defaults: GCS, dashboard agent (HTTP), client server
        assert not ports & {6379, 52365, 10001}, sorted(ports)
        assert all(is_loopback(ip) for ip, _ in listening), listening
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in family if alive(p)], "the head outlived its killed driver"
    # a driver that ends normally, after a task ran on workers: nothing of its instance stays
    script = ("import time\nfrom raykd.cluster.ray_env import init_ray\nimport ray\n"
              "init_ray(num_cpus=1)\nray.get(ray.remote(lambda: 1).remote())\n"
              "print(flush=True)\ntime.sleep(5)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=env)
    driver.stdout.readline()
    family = descendants(driver.pid)
    assert len(family) >= 5, "the head, its GCS, raylet, dashboard, a worker"
    assert driver.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in family if alive(p)], "the instance outlived its driver's exit"


def test_the_command_reports_a_failed_run_and_its_dependants_then_resumes(
        ray_session, tmp_path, digits_teacher, capsys, monkeypatch):
    job = small_job(tmp_path, name="cli", methods={"ce": {}, "born": {"method": "kd", "chain": 2}},
                    ray={"workers": 1, "max_failures": 0})
    job["teacher"] = {"checkpoint": str(digits_teacher)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    monkeypatch.setenv("RAYKD_FAIL_AT", "seed0-born.1:1")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 runs failed: seed0-born.1 (" in err and "seed0-born.2 (not run: " \
        "seed0-born.1 failed)" in err and "re-run the job to resume" in err
    kept = pd.read_parquet(tmp_path / "cli" / "results.parquet")
    assert list(kept.unit) == ["seed0-ce"], "the run that could finish did"
    monkeypatch.delenv("RAYKD_FAIL_AT")
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "born.2" in out and "results: " in out
    rows = pd.read_parquet(tmp_path / "cli" / "results.parquet")
    assert sorted(rows.unit) == ["seed0-born.1", "seed0-born.2", "seed0-ce"]
    assert rows[rows.unit == "seed0-born.1"].resumed_from.iloc[0] == 1


def test_a_teacher_re_exported_to_the_same_path_is_never_served_stale(ray_session, tmp_path):
    """Two jobs distil from the same teacher path; between them the file is replaced by another
    teacher. The second job's students see the new teacher's outputs, not the cached old ones."""
    from raykd.models import build_model
    from raykd.models.export import save_export

    teacher = tmp_path / "teacher.pt"

    def export(seed):
        torch.manual_seed(seed)
        save_export(build_model("cnn", 10, 1, 8), teacher, 10, 1, 8)

    def first_batch_confidence(name):
        job = small_job(tmp_path, name=name, methods={"kd": {}},
                        student={"model": "cnn_small", "train": {"epochs": 1, "lr": 0.1}})
        job["teacher"] = {"checkpoint": str(teacher), "placement": "local", "cache": True}
        run_job(job_from_dict(job))
        diag = pd.read_parquet(tmp_path / name / "diagnostics" / "seed0-kd" / "epoch-0001.parquet")
        return diag.teacher_true_conf.to_numpy()

    export(0)
    old = first_batch_confidence("before")
    export(1)                       # re-trained, re-exported to the same path
    new = first_batch_confidence("after")
    entries = [p for p in (tmp_path / "feature_cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2, "the replaced teacher is a new cache entry"
    assert not (abs(old - new) < 1e-6).all(), "the second job saw the new teacher"


def test_sigterm_stops_the_driver_in_one_line_as_ctrl_c_does(ray_session, tmp_path,
                                                              digits_teacher):
    """`kill PID` (a scheduler's stop) ends `raykd run` like Ctrl-C: one line, exit 143, no
    crash dump, and nothing of the job keeps the session's CPUs."""
    job = slow_job(tmp_path, digits_teacher, "term", methods={"ce": {}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([RAYKD, "run", str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and \
            epochs_done(tmp_path / "term" / "metrics" / "seed0-ce.jsonl") < 1:
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    try:
        _, err = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        raise AssertionError("SIGTERM did not stop the driver within 60 s") from None
    assert driver.returncode == 143, err[-2000:]
    # (a worker's last progress line may still arrive after it, while Ray shuts down)
    assert "raykd: terminated; re-run the same command to resume" in err.splitlines(), err
    assert "Traceback" not in err and "SIGABRT" not in err
    assert all_cpus_free(ray_session), "something of the job still holds the session's CPUs"


STOP_IN_A_HUNG_CLEANUP = """
import os, signal, sys, time
from raykd.cluster import ray_env
ray_env.new_command(forced_exit=True)
ray_env.EXIT_GRACE_S = float(sys.argv[1])
ray_env.stop_on_signals()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
finally:
    time.sleep(60)   # a cleanup that waits on something that never comes (as Tune's once did)
"""


def test_a_stop_ends_the_process_in_bounded_time_whatever_its_cleanup_waits_on():
    """The command's process ends with its one line and exit 130 within the grace period of
    Ctrl-C, even when the unwinding hangs before the interrupt reaches the CLI (a sweep's Ctrl-C
    once spent over 30 s in Tune's trial cleanup)."""
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", STOP_IN_A_HUNG_CLEANUP, "1.0"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 130, res.stderr[-2000:]
    assert time.monotonic() - start < 20, "the stop waited for the cleanup"
    assert res.stderr.splitlines() == ["raykd: interrupted; re-run the same command to resume"]


def test_a_second_driver_on_a_running_jobs_folder_stops_in_one_line_or_waits(
        ray_session, tmp_path, digits_teacher):
    """Two `raykd run` of one job on one folder would both train its units: the second exits
    at once naming the owner, or with --wait runs once the first has ended (finding it done)."""
    job = slow_job(tmp_path, digits_teacher, "owned", methods={"ce": {}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = subprocess.Popen([RAYKD, "run", str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and \
            epochs_done(tmp_path / "owned" / "metrics" / "seed0-ce.jsonl") < 1:
        time.sleep(0.1)
    second = subprocess.run([RAYKD, "run", str(path)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert "is in use by another raykd driver" in line and f"(pid {first.pid} on " in line, line
    waiting = subprocess.Popen([RAYKD, "run", str(path), "--wait"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    _, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-2000:]
    assert "1 of 1 runs already finished" in err
    rows = pd.read_parquet(tmp_path / "owned" / "results.parquet")
    assert list(rows.unit) == ["seed0-ce"], "one row: trained once"


def test_damaged_state_is_set_aside_and_the_rerun_repairs_it(ray_session, tmp_path,
                                                              digits_teacher, capsys):
    """A truncated results table and a truncated unit checkpoint, written by the test: `raykd
    results` says in one line what is wrong; the re-run sets both aside (`*.damaged`, a warning
    naming each), rebuilds the finished unit's row without training it, and trains the unit
    whose checkpoint was damaged from the start, instead of failing the same way forever."""
    from raykd.train.layout import state_file

    spec = job_from_dict(small_job(tmp_path, name="damaged", methods={"ce": {}, "kd": {}},
                                   teacher={"checkpoint": str(digits_teacher)}))
    first = run_job(spec).set_index("unit")
    results = spec.run_dir / "results.parquet"
    results.write_bytes(results.read_bytes()[:40])
    [state] = sorted((spec.run_dir / "ray").rglob(state_file("seed0-kd")),
                     key=lambda p: p.stat().st_mtime)[-1:]
    state.write_bytes(state.read_bytes()[:100])
    (spec.run_dir / "models" / "seed0-kd.pt").unlink()     # so it is not taken as finished
    capsys.readouterr()
    assert main(["results", str(spec.run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is damaged" in err and "re-run the job" in err and len(err.splitlines()) == 1, err
    again = run_job(spec).set_index("unit")
    assert (spec.run_dir / "results.parquet.damaged").is_file()
    assert Path(f"{state}.damaged").is_file()
    assert again.loc["seed0-ce", "resumed_from"] == 3, "rebuilt from its checkpoint, not retrained"
    assert again.loc["seed0-ce", "val_top1"] == first.loc["seed0-ce", "val_top1"]
    assert again.loc["seed0-kd", "resumed_from"] == 0 and again.loc["seed0-kd", "epochs"] == 3
    history = (spec.run_dir / "metrics" / "seed0-kd.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2, 3]


def test_a_full_disk_is_one_line_naming_where_and_what_to_do(tmp_path, capsys, monkeypatch):
    """A real ENOSPC from the OS (writing to /dev/full) and torch.save's zip-writer message
    from a worker: the job's end and the command's are one line saying the device is full."""
    from types import SimpleNamespace

    import pytest

    from raykd import cli
    from raykd.driver.pipeline import JobRun
    from raykd.errors import RaykdError, out_of_space

    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:
            f.write("x")
            f.flush()
    assert out_of_space(full.value)
    worker = ("RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 512 vs "
              "448")
    run = SimpleNamespace(units={"a": 1, "b": 2, "c": 3}, run_dir=tmp_path / "job")
    with pytest.raises(RaykdError) as err:
        JobRun.finish(run, {"b": worker, "c": "not run: b failed"})
    assert str(err.value).startswith(f"no space left on the device holding {tmp_path / 'job'}; "
                                     "2 of 3 runs failed (b first); free space and re-run")

    def writes_to_a_full_disk(args):
        with open("/dev/full", "w") as f:
            f.write("x")
            f.flush()
    monkeypatch.setattr(cli, "_cmd_results", writes_to_a_full_disk)
    capsys.readouterr()
    assert cli.main(["results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raykd: error: no space left on the device holding") and \
        "free space and re-run" in err and len(err.splitlines()) == 1, err
    assert cli.main(["report", str(tmp_path), "--out", "/dev/full"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
