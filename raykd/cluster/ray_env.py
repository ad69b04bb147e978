"""Starting or joining Ray with the settings this project relies on (measured on Ray 2.60)."""
from __future__ import annotations

import ipaddress
import logging
import os

from raykd.errors import RaykdError, Terminated
from raykd.log import log

# Set before ray.init so that every Ray process inherits them.
_DEFAULTS = {
    # faster Train teardown on small machines (measured: fit() 12 s -> 7.5 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    # Train V2's result.metrics / logs stay quiet about the deprecated V1 paths
    "RAY_TRAIN_V2_ENABLED": "1",
    # one line per epoch is the progress output; Ray's de-duplication would fold it away, and
    # Train's print patch would print it twice (once itself, once through its logger)
    "RAY_DEDUP_LOGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # worker lines reach the driver as plain "(RayTrainWorker pid=N) raykd: ..." text, with no
    # colour codes, so a run's output stays readable when piped to a file
    "RAY_COLOR_PREFIX": "0",
    # Ctrl-C stops `raykd sweep` at once, as it stops `raykd run` (exit 130; re-run to resume):
    # Tune's own handler would first wait for every trial to save, which a trial that is not
    # placed never does
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}


# Ray's switch for clusters on macOS and Windows; "0" keeps a node on 127.0.0.1 on every platform
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def set_ray_env() -> None:
    for k, v in _DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("RAY_ADDRESS"):
        # A local instance listens on loopback only: with this set before ray is imported, Ray
        # takes 127.0.0.1 as the node's address and every server it starts (GCS, raylet, object
        # manager, agents, each worker's and actor's gRPC port) binds there instead of on all
        # interfaces (measured on Ray 2.60 by tests/test_faults.py's listener check). Ray reads
        # it once, at import. A driver that joins a cluster takes its node's address from the
        # cluster, so this changes nothing there.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
        # Bound to loopback, a local instance needs no token: Ray 2.60 would otherwise turn
        # token auth on and write ~/.ray/auth_token on the first init. Inside a job submitted to
        # a cluster (RAY_ADDRESS set) the cluster's own mode, inherited from its raylet, applies.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


TERMINATED: list[int] = []   # SIGTERM received (the CLI says "terminated", exits 143)
FORCED_EXIT: list[bool] = []   # set by the `raykd` command: a stop ends the process in bounded time
EXIT_GRACE_S = 15.0   # after Ctrl-C or SIGTERM, the longest the unwinding and clean exit may take
_announced: list[bool] = []
_armed: list[bool] = []


def new_command(forced_exit: bool) -> None:
    """Start a command's stop state afresh. `forced_exit`: the `raykd` process itself, which may
    end by os._exit once stopped (never a caller of cli.main in a process of its own, such as a
    test); it also dumps every thread's stack on SIGUSR1 (`kill -USR1 PID`), for a stop that
    hangs."""
    import faulthandler
    import signal

    TERMINATED.clear()
    _announced.clear()
    _armed.clear()
    FORCED_EXIT.clear()
    if forced_exit:
        FORCED_EXIT.append(True)
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def announce_stop() -> int:
    """Say once, on stderr, that the command was stopped and how to go on; its exit code."""
    import sys

    terminated = bool(TERMINATED)
    if not _announced:
        _announced.append(True)
        print(f"raykd: {'terminated' if terminated else 'interrupted'}; re-run the same command "
              "to resume", file=sys.stderr, flush=True)
    return 143 if terminated else 130


def exit_within(seconds: float) -> None:
    """End the process after `seconds` if unwinding and the clean exit (Tune's cleanup of its
    trials, Ray's disconnect, the local instance's stop, threads a library left running) have not
    ended it: everything finished is on disk already, and Ctrl-C must stop raykd. Armed at the
    signal itself, not once the exception reaches the CLI: a sweep's Ctrl-C once spent over 30 s
    inside Tune's cleanup before its KeyboardInterrupt came out (tests/test_sweep.py)."""
    import sys
    import threading

    def force() -> None:
        code = announce_stop()
        sys.stdout.flush()
        os._exit(code)

    if _armed:
        return
    _armed.append(True)
    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the driver the same way: one line, exit 130 or 143, re-run to
    resume; not Ray's SIGTERM handler (sys.exit from inside whatever Ray was doing, then a crash
    dump), nor Tune's SIGINT one (it waits for every trial to save). Under the `raykd` command
    the process ends within EXIT_GRACE_S of the signal whatever the unwinding waits on. Set after
    ray.init, which installs Ray's; only the main thread can."""
    import signal
    import threading

    def stop(signum, frame):
        if signum == signal.SIGTERM:
            TERMINATED.append(signum)   # Ray may turn the exception into a plain KeyboardInterrupt
        if FORCED_EXIT:
            exit_within(EXIT_GRACE_S)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             log_to_driver: bool = True, runtime_env: dict | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local instance on loopback;
    `runtime_env` is the whole driver's (every task, actor, Train run and Tune trial inherits
    it: the job's factories of its own, raykd.job.factories)."""
    import ray

    set_ray_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own start-up lines (with colour codes) stay quiet; raykd says where the dashboard is
    quiet = {"logging_level": logging.WARNING,
             **({"runtime_env": runtime_env} if runtime_env else {})}
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **quiet)
    else:
        # A head of its own on free loopback ports (raykd.cluster.local_head), with the dashboard,
        # which serves the state API that Train's placement-group cleaner polls (without it
        # that cleaner logs a warning every second), and the `raykd_trial` slots that sweep
        # trial drivers take instead of a CPU (raykd.sweep). The head stops at exit.
        from raykd.cluster.local_head import LocalHead

        head = LocalHead(num_cpus)
        ray.init(address=head.address, log_to_driver=log_to_driver, **quiet)
        node_ip = ray.util.get_node_ip_address()
        if not ipaddress.ip_address(node_ip).is_loopback:
            ray.shutdown()
            raise RaykdError(
                f"the local Ray instance would listen on {node_ip}, not on loopback only: ray was "
                f"imported before raykd set {LOOPBACK_ONLY}=0; import raykd first, or set it "
                "in the environment")
        log.info("started a local Ray instance (%d CPUs); dashboard: http://%s",
                 int(ray.cluster_resources().get("CPU", 0)), head.dashboard)
