"""`raykd submit`: a job on a Ray cluster through Ray's job-submission SDK.

The project folder is the job's `working_dir` (uploaded to the cluster, honouring .gitignore),
and the entrypoint is `python -m raykd run JOB.yaml ... --emit-results`. Logs are streamed by
polling (the SDK's HTTP calls have no timeout of their own, so every call here is bounded), and
the command exits non-zero when the job fails or is stopped.

Results: the Jobs API cannot download files, so the job prints its results table (a few KB of
Parquet, base64) between two marker lines at the end of its log, and `raykd submit` writes it to
`RESULTS_DIR/NAME/results.parquet` locally (default: the job's `output_dir` as seen from here).
Models, checkpoints and metrics stay in the cluster's `output_dir` (shared storage on a
multi-node cluster; README: On a Ray cluster).

Token authentication: the token comes from `--token-file`, `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (in that order) and is sent as a bearer header; a
cluster that refuses it ends in a one-line error.
"""
from __future__ import annotations

import base64
import io
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from raykd.errors import RaykdError, one_line

RESULTS_BEGIN = "RAYKD-RESULTS-BEGIN"
RESULTS_END = "RAYKD-RESULTS-END"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CONNECT_TIMEOUT_S = 5.0
AGENT_WAIT_S = 60.0   # how long a submission waits for a freshly started head's job agent


def emit_results(frame) -> None:
    """Print the results table as base64 Parquet between marker lines (inside a submitted job)."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    print(RESULTS_BEGIN, flush=True)
    data = base64.b64encode(buf.getvalue()).decode()
    for i in range(0, len(data), 120):
        print(data[i:i + 120])
    print(RESULTS_END, flush=True)


def results_from_logs(logs: str):
    """The results table a job emitted, or None."""
    import pandas as pd

    if RESULTS_BEGIN not in logs or RESULTS_END not in logs:
        return None
    body = logs.rsplit(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)[0]
    return pd.read_parquet(io.BytesIO(base64.b64decode("".join(body.split()))))


def check_address(address: str | None) -> str:
    """The dashboard URL to submit to; one-line errors for the known pitfalls."""
    if not address:
        address = os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
        if not address:
            raise RaykdError("give the cluster's dashboard address, e.g. --address "
                             "http://127.0.0.1:8265 (port-forward 8265 from the head node)")
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RaykdError(f"--address {address!r}: give the dashboard URL with its scheme, e.g. "
                         f"http://{address.split('://')[-1]} (without a scheme Ray treats it as "
                         "a GCS address and retries for minutes)")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RaykdError(f"cannot reach the Ray dashboard at {address} within "
                         f"{CONNECT_TIMEOUT_S:g} s ({e.__class__.__name__}); is the head up and "
                         "port 8265 forwarded?") from None
    return address.rstrip("/")


def read_token(token_file: str | None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise RaykdError(f"--token-file: no such file {path}")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().read_text().strip()
    return None


class Cluster:
    """A bounded, authenticated JobSubmissionClient."""

    def __init__(self, address: str | None, token_file: str | None = None):
        self.address = check_address(address)
        # the SDK lets these override the address it is given, silently: the flag wins here
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            os.environ.pop(name, None)
        token = read_token(token_file)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
        except Exception as e:
            raise RaykdError(self._explain(e)) from None

    def _explain(self, e: Exception) -> str:
        text = one_line(e, first=True)
        if "uthentication" in text or "401" in text or "403" in text or "Unauthorized" in text:
            return (f"the cluster at {self.address} refused the request: {text.split('.')[0]} "
                    "(pass its token with --token-file or RAY_AUTH_TOKEN)")
        return f"{self.address}: {text}"

    def call(self, name: str, *args, **kwargs):
        try:
            return getattr(self.client, name)(*args, **kwargs)
        except Exception as e:
            raise RaykdError(self._explain(e)) from None

    def submit(self, job_path: str, overrides: list[str], project: Path) -> str:
        entry = " ".join(["python", "-m", "raykd", "run", shlex.quote(job_path),
                          *map(shlex.quote, overrides), "--emit-results"])
        runtime_env = {"working_dir": str(project),
                       "excludes": [".venv/", "runs/", "bench/runs/", ".git/", "*.pt", "*.parquet"]}
        # our own id, so that a retry after a lost reply can never submit the job twice
        submission_id = f"raysubmit_raykd_{uuid.uuid4().hex[:16]}"
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return self.client.submit_job(entrypoint=entry, runtime_env=runtime_env,
                                              submission_id=submission_id)
            except Exception as e:
                text = one_line(e, first=True)
                if "already exists" in text:      # an earlier try went through
                    return submission_id
                # a head that has just started has no job agent yet: Ray says "try again later"
                if "try again later" not in text or time.monotonic() > deadline:
                    raise RaykdError(self._explain(e)) from None
                time.sleep(2.0)

    def follow(self, job_id: str, out=sys.stdout, poll_s: float = 1.0) -> tuple[str, str]:
        """Print the job's log as it grows (without the results block); return (final status,
        whole log)."""
        shown = 0
        while True:
            status = str(self.call("get_job_status", job_id)).split(".")[-1]
            logs = self.call("get_job_logs", job_id)
            visible = logs.split(RESULTS_BEGIN, 1)[0]
            if len(visible) > shown:
                out.write(visible[shown:])
                out.flush()
                shown = len(visible)
            if status in TERMINAL:
                return status, logs
            time.sleep(poll_s)


def check_factories_travel(spec, project: Path) -> None:
    """Every factory of the user's own that the job names reaches the cluster: its module inside
    the project folder (the job's working_dir, on every node's path) or an installed package."""
    from raykd.job import factories
    from raykd.job.config import job_factories

    stranded = factories.outside(job_factories(spec), project)
    if stranded:
        name, origin = stranded[0]
        raise RaykdError(f"{name}: its module ({origin}) is outside the project folder {project}, "
                         "which is all the cluster receives (working_dir); move it inside, or "
                         "install it on the cluster as a package")


def job_path_in_project(job: str, project: Path) -> str:
    path = Path(job).resolve()
    try:
        return str(path.relative_to(project))
    except ValueError:
        raise RaykdError(f"{job} is outside the project folder {project}, which is what the "
                         "cluster receives (working_dir); put the job file inside it") from None
