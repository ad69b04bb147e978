"""The job's teacher services: started when a teacher's first user launches, stopped when its
last user ends, never holding more CPUs than leave room for one training run."""
from __future__ import annotations

from pathlib import Path

import ray

from raykd.errors import RaykdError
from raykd.job.specs import TeacherSpec
from raykd.log import log
from raykd.teacher.handle import TeacherHandle
from raykd.teacher.service import TeacherService


def resolve_placement(teacher: TeacherSpec) -> str:
    """`auto` serves the teacher from shard actors only when the job asks for several shards or
    replicas: for one copy of a small teacher the in-process forward is faster (bench/RESULTS.md)."""
    if teacher.placement != "auto":
        return teacher.placement
    return "actors" if (teacher.shards > 1 or teacher.replicas > 1) else "local"


class TeacherPool:
    def __init__(self, job_name: str, teacher: TeacherSpec, cache_dir: str | None, input_shape,
                 users: list[list[str]], most_at_once: int, run_cpus: float,
                 runtime_env: dict | None = None):
        """`users`: each future unit's teacher exports; `most_at_once`: the most teachers one
        unit uses at once; `run_cpus`: what one training run needs; `runtime_env`: the shard
        actors' (the job's factories of its own, raykd.job.factories)."""
        self.job_name, self.spec, self.input_shape = job_name, teacher, input_shape
        self.runtime_env = runtime_env
        self.placement = resolve_placement(teacher)
        self.cache_dir = cache_dir
        self.live: dict[str, TeacherService] = {}
        self.users: dict[str, int] = {}
        for exports in users:
            for export in exports:
                self.users[export] = self.users.get(export, 0) + 1
        self.service_cpus = teacher.cpus_per_shard * teacher.shards * teacher.replicas
        self.run_cpus = run_cpus
        self.total_cpus = ray.cluster_resources().get("CPU", 0)
        need = most_at_once * self.service_cpus
        if self.placement == "actors" and need + run_cpus > self.total_cpus:
            raise RaykdError(
                f"teacher services need {need:g} CPUs ({most_at_once} teacher(s) x shards x "
                f"replicas x cpus_per_shard) plus {run_cpus:g} for a training run, but the "
                f"cluster has {self.total_cpus:g}; lower teacher.cpus_per_shard or use "
                "teacher.placement=local")

    def handles_for(self, exports: list[str]) -> list[TeacherHandle] | None:
        """Handles for these teacher exports, starting services as needed; None if the caller
        must wait for another teacher's users to finish."""
        if self.placement == "local":
            return [TeacherHandle(e, "local", cache_dir=self.cache_dir) for e in exports]
        missing = [e for e in exports if e not in self.live]
        used = self.service_cpus * len(self.live)
        if used + self.service_cpus * len(missing) + self.run_cpus > self.total_cpus:
            return None
        t = self.spec
        for export in missing:
            name = f"{self.job_name}/{Path(export).stem}"
            log.info("starting teacher service %s: %d shard(s) x %d replica(s)", name, t.shards,
                     t.replicas)
            service = TeacherService(
                name, export, self.input_shape, shards=t.shards, replicas=t.replicas,
                cpus_per_shard=t.cpus_per_shard, gpus_per_shard=t.gpus_per_shard,
                timeout_s=t.timeout_s, cache_dir=self.cache_dir, runtime_env=self.runtime_env)
            service.wait_ready()
            self.live[export] = service
        return [self.live[e].handle for e in exports]

    def release(self, exports: list[str]) -> None:
        for export in exports:
            self.users[export] -= 1
            if self.users[export] == 0 and export in self.live:
                self.live.pop(export).stop()

    def stop_all(self) -> None:
        for service in self.live.values():
            service.stop()
        self.live.clear()
