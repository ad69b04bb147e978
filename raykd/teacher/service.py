"""The teacher service: shard actors chained into a pipeline, replicated, found by name.

The driver starts a `TeacherService` (replicas x shards actors, each named
`{service}/r{replica}/s{shard}`) and hands training runs a `TeacherHandle`. Inside a run, a
`TeacherClient` sends a batch to shard 0 of one replica and passes each shard's output reference
straight to the next shard, so activations never travel through the driver or the client. Only
the requested taps come back.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import ray
import torch

from raykd.errors import RaykdError
from raykd.models.export import load_export
from raykd.teacher.handle import TeacherHandle
from raykd.teacher.shard import TeacherShard, partition_blocks

NAMESPACE = "raykd"
# A shard actor that dies is restarted by Ray (max_restarts) and the tasks it was running or
# had queued are re-executed by Ray (max_task_retries): a request in flight completes with the
# right values without any resend of ours (tests/test_teacher.py shows it, and that with
# task_retries=0 the same kill fails the request). Once the restarts are spent, the error is ours.
RESTARTS = 3
RETRIES = 3


def shard_name(service: str, replica: int, shard: int) -> str:
    return f"{service}/r{replica}/s{shard}"


class TeacherService:
    """Starts and stops the shard actors of one teacher."""

    def __init__(self, name: str, export_path: str, input_shape, shards: int = 1,
                 replicas: int = 1, cpus_per_shard: float = 1.0, gpus_per_shard: float = 0.0,
                 timeout_s: float = 120.0, cache_dir: str | None = None,
                 task_retries: int = RETRIES, runtime_env: dict | None = None):
        model = load_export(export_path)
        self.name = name
        self.ranges = partition_blocks(model, shards, input_shape)
        tap_blocks = {t: model.block_index(t) for t in model.tap_names}
        self.handle = TeacherHandle(
            export_path=str(export_path), placement="actors", service=name, replicas=replicas,
            ranges=self.ranges, tap_blocks=tap_blocks, timeout_s=timeout_s, cache_dir=cache_dir)
        self.actors = []
        for r in range(replicas):
            for k, (start, stop) in enumerate(self.ranges):
                self.actors.append(TeacherShard.options(
                    name=shard_name(name, r, k), namespace=NAMESPACE, lifetime=None,
                    num_cpus=cpus_per_shard, num_gpus=gpus_per_shard,
                    max_restarts=RESTARTS, max_task_retries=task_retries,
                    **({"runtime_env": runtime_env} if runtime_env else {}),
                ).remote(str(export_path), start, stop, max(1, int(cpus_per_shard))))

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RaykdError(f"teacher service {self.name}: shard actors did not start within "
                             f"{timeout_s:.0f} s (not enough free CPUs/GPUs for them?)") from e

    def stop(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class _PendingRefs:
    def __init__(self, client: "TeacherClient", x: np.ndarray, taps: list[str], refs: list):
        self.client, self.x, self.taps, self.refs = client, x, taps, refs

    def result(self) -> dict[str, torch.Tensor]:
        return self.client._collect(self)


class TeacherClient:
    """The `Teacher` interface over a running service (used inside training workers)."""

    def __init__(self, handle: TeacherHandle, device="cpu"):
        self.handle = handle
        self.device = torch.device(device)
        self.model = load_export(handle.export_path)   # architecture for shapes; not run here
        self._actors: dict[tuple[int, int], ray.actor.ActorHandle] = {}
        # clients start on different replicas so concurrent runs spread the load
        self._next_replica = itertools.cycle(
            np.roll(np.arange(handle.replicas), os.getpid() % handle.replicas).tolist())

    def _actor(self, replica: int, shard: int):
        key = (replica, shard)
        if key not in self._actors:
            self._actors[key] = ray.get_actor(
                shard_name(self.handle.service, replica, shard), namespace=NAMESPACE)
        return self._actors[key]

    def _tap_block(self, tap: str) -> int:
        try:
            return self.handle.tap_blocks[tap]
        except KeyError:
            raise RaykdError(f"unknown tap {tap!r}; allowed: {', '.join(self.handle.tap_blocks)}")

    def _send(self, x: np.ndarray, taps: list[str]) -> list:
        wanted = {t: self._tap_block(t) for t in taps}
        if not wanted:
            return []
        last_block = max(wanted.values())
        replica = next(self._next_replica)
        act, refs = x, []
        for k, (start, stop) in enumerate(self.handle.ranges):
            if start > last_block:
                break
            mine = {t: i for t, i in wanted.items() if start <= i < stop}
            pass_on = stop <= last_block
            act, taps_ref = self._actor(replica, k).forward.options(num_returns=2).remote(
                act, mine, pass_on)
            if mine:
                refs.append(taps_ref)
        return refs

    def submit(self, x: torch.Tensor, taps: list[str], index=None) -> _PendingRefs:
        arr = x.detach().cpu().numpy()
        return _PendingRefs(self, arr, list(taps), self._send(arr, list(taps)))

    def features(self, x: torch.Tensor, taps: list[str], index=None) -> dict[str, torch.Tensor]:
        return self.submit(x, taps).result()

    def checksum(self) -> str:
        """Of the weights the shard actors hold, every shard of every replica (not a local copy:
        these are the weights that compute what this client receives)."""
        import hashlib

        parts = ray.get([self._actor(r, k).checksum.remote()
                         for r in range(self.handle.replicas)
                         for k in range(len(self.handle.ranges))], timeout=self.handle.timeout_s)
        per_replica = len(self.handle.ranges)
        replicas = {"/".join(parts[i:i + per_replica]) for i in range(0, len(parts), per_replica)}
        return hashlib.sha256("|".join(sorted(replicas)).encode()).hexdigest()[:16]

    def _collect(self, pending: _PendingRefs) -> dict[str, torch.Tensor]:
        try:
            parts = ray.get(pending.refs, timeout=self.handle.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise RaykdError(f"teacher service {self.handle.service}: no answer within "
                             f"{self.handle.timeout_s:.0f} s") from e
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise RaykdError(f"teacher service {self.handle.service}: a shard actor died and "
                             f"Ray could not recover the request ({type(e).__name__}; restarts "
                             f"spent or task retries off)") from e
        out = {}
        for part in parts:
            out.update({t: torch.from_numpy(np.array(a)).to(self.device) for t, a in part.items()})
        return out
