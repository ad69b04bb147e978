"""DIH head training: one Ray Train run training all heads on one teacher pass ("together")
against one run per head, concurrently ("separate"), side by side.

The quickstart's teacher (cnn_wide) on mnist5k (1,000 training images), heads on its 3 stages,
10 epochs, 2 CPUs; the teacher's outputs come from the cache in both layouts (filled beforehand,
so neither pays for it).

    .venv/bin/python bench/heads_layout.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import fresh_workdir, machine, quickstart_teacher, write_section  # noqa: E402


def main() -> None:
    from raykd.cluster.ray_env import init_ray, set_ray_env
    set_ray_env()   # before ray is imported: Ray reads its loopback-only mode at import

    import ray

    from raykd.data import load_dataset
    from raykd.driver.plan import plan_units
    from raykd.job.config import job_from_dict
    from raykd.teacher import LocalTeacher, TeacherHandle
    from raykd.teacher.cache import cached_teacher
    from raykd.train.runner import RunSettings, fit_units

    work = fresh_workdir("heads_layout")
    teacher_path = quickstart_teacher(work)
    init_ray(num_cpus=2, log_to_driver=False)

    def spec(layout):
        return job_from_dict({
            "name": layout, "output_dir": str(work), "seeds": [0],
            "data": {"dataset": "mnist5k", "train_size": 1000, "batch_size": 64},
            "teacher": {"model": "cnn_wide", "checkpoint": str(teacher_path)},
            "heads": {"layout": layout, "train": {"epochs": 10}},
            "methods": {"dih": {}}, "ray": {"max_failures": 0}})

    timings = {}
    for layout in ("together", "separate"):
        s = spec(layout)
        splits = load_dataset(s.data)
        units = [u for u in plan_units(s, splits) if u.role == "head"]
        cache_dir = str(work / "feature_cache")
        for u in units:
            u.teachers = [TeacherHandle(str(teacher_path), "local", cache_dir=cache_dir)]
        # fill the cache first so both layouts read the same stored stage maps
        cached_teacher(LocalTeacher(teacher_path), u.teachers[0].cache_dir, str(teacher_path), s.data,
                       "train", splits.train, ["stage1", "stage2", "stage3"], 512, log=lambda m: None)
        started = time.perf_counter()
        rows = [r for out in ray.get([fit_units.remote([u], RunSettings(
                    str(s.run_dir / "ray"), 10, splits.input_shape, max_failures=0)) for u in units])
                for r in out.values()]
        timings[layout] = (time.perf_counter() - started, len(units),
                           sum(r["train_s"] for group in rows for r in group[:1]))
        print(layout, timings[layout], flush=True)
    ray.shutdown()
    (t_wall, t_runs, t_train), (s_wall, s_runs, s_train) = timings["together"], timings["separate"]
    body = f"""## DIH heads: one run for all heads vs one run per head

`.venv/bin/python bench/heads_layout.py`; {machine()}.
Heads on cnn_wide's 3 stages, mnist5k (1,000 training images), 10 epochs, stage maps from the
teacher-output cache, 2 CPUs.

| layout | Ray Train runs | wall time | training time (sum over runs) |
| --- | --- | --- | --- |
| together (one run, all heads on one teacher pass) | {t_runs} | {t_wall:.1f} s | {t_train:.1f} s |
| separate (one run per head, concurrent) | {s_runs} | {s_wall:.1f} s | {s_train:.1f} s |

separate / together wall time: **{s_wall / t_wall:.2f}x**. Each run pays Ray Train's fixed
start-up (about 10 s here) while a head's training is a fraction of that, so `heads.layout`
defaults to `together`; `separate` pays off when heads are expensive to train and there are
more workers than heads' worth of start-up (e.g. ImageNet-sized maps on a GPU cluster).
"""
    write_section("heads_layout", body)
    print(body)


if __name__ == "__main__":
    main()
