"""raykd: knowledge distillation on Ray. `raykd.run(job)` runs a job from Python (raykd.api);
the `raykd` command (raykd.cli) is a thin layer over the same steps."""
from raykd.cluster.ray_env import set_ray_env as _set_ray_env

# before anything imports ray: a local instance then listens on loopback only (raykd.cluster.ray_env)
_set_ray_env()

from raykd.api import run  # noqa: E402
from raykd.errors import RaykdError  # noqa: E402

__all__ = ["RaykdError", "run"]
