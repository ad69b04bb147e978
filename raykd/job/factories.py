"""Code of the user's own, named `package.module:function` in a job file: a model factory
(`teacher.model`, `student.model`) or a data factory (`data.dataset`).

raykd imports such a function only because a job file names it (raykd.job.config, or a run folder's
own job.yaml), never because a file it reads (an export, a checkpoint) does. The Ray processes a
job starts get the job's list, and the folders the modules import from, through `runtime_env`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Callable

from raykd.errors import RaykdError, one_line
from raykd.files import file_hash

FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")   # package.module:function
FACTORIES_ENV = "RAYKD_FACTORIES"    # the factories a job names, for the processes it starts

# what this process may import; Ray processes a job starts inherit the job's list
_ALLOWED: set[str] = {f for f in os.environ.get(FACTORIES_ENV, "").split(",") if f}


def is_factory(name) -> bool:
    return isinstance(name, str) and ":" in name and bool(FACTORY.fullmatch(name)) \
        and name.split(":", 1)[0] not in ("torchvision", "timm")


def factories(names) -> list[str]:
    return sorted({n for n in names if is_factory(n)})


def allow(names) -> None:
    """Let this process import these factories (those a job file names)."""
    _ALLOWED.update(factories(names))


def runtime_env(names) -> dict | None:
    """The `runtime_env` for Ray work that calls these factories: their names, and the folders
    they import from on PYTHONPATH (None when there are none)."""
    wanted = factories(names)
    if not wanted:
        return None
    roots = {module_root(n.split(":")[0]) for n in wanted}
    path = os.pathsep.join([*sorted(r for r in roots if r), os.environ.get("PYTHONPATH", "")])
    return {"env_vars": {FACTORIES_ENV: ",".join(wanted), "PYTHONPATH": path.strip(os.pathsep)}}


def cwd_on_path() -> None:
    """The folder raykd runs from is searched last for your modules, as `python -m` searches it
    first (a console script's path starts at its own folder instead)."""
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def module_root(module: str) -> str | None:
    """The folder a module is imported from (the parent of its top-level package)."""
    cwd_on_path()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin)
    depth = module.count(".") + (1 if origin.name == "__init__.py" else 0)
    return str(origin.parents[depth])


def code_fingerprint(name: str) -> str:
    """What decides what a factory builds, besides its arguments: its module file's content."""
    cwd_on_path()
    spec = importlib.util.find_spec(name.split(":")[0])
    origin = spec.origin if spec else None
    return f"factory {file_hash(origin)}" if origin and os.path.isfile(origin) else name


def outside(names, project: Path) -> list[tuple[str, str]]:
    """(factory, its module's file) for the factories whose module a cluster would not receive
    with `project` as the job's working_dir: neither inside it nor an installed package."""
    cwd_on_path()
    found = []
    for name in factories(names):
        spec = importlib.util.find_spec(name.split(":")[0].split(".")[0])
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin is None:
            found.append((name, "not found here"))
        elif not (origin.is_relative_to(project.resolve())
                  or {"site-packages", "dist-packages"} & set(origin.parts)):
            found.append((name, str(origin)))
    return found


def check_allowed(name: str, where: str) -> None:
    if name not in _ALLOWED:
        raise RaykdError(f"{where} {name}: raykd imports a function of your own only when the "
                         "job file names it, never because a file it reads does")


def load(name: str, where: str) -> Callable:
    """The function `package.module:function` names, imported (it must be allowed)."""
    check_allowed(name, where)
    module_name, function = name.split(":")
    cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        import socket

        raise RaykdError(f"{where} {name}: cannot import {module_name} on {socket.gethostname()} "
                         f"({one_line(e)}); it must be on the Python path (the folder you run "
                         "raykd from is; on a cluster, the submitted project folder)") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise RaykdError(f"{where} {name}: {module_name} has no function {function!r}")
    return found


# where raykd.run takes a callable instead of a name (raykd.api)
CALLABLE_FIELDS = (("teacher", "model"), ("teacher", "models"), ("student", "model"),
                   ("data", "dataset"))


def source_name(obj, where: str):
    """The name a job file would give for `obj`, a callable passed from Python as a model or data
    source: `torchvision:NAME` for a torchvision builder or dataset class, `timm:NAME` for a timm
    model's entry point, else `package.module:function`. Ray's processes import a source by name,
    so it must be a module's top-level function or class (not a lambda, a nested function, or one
    of `__main__`, such as a notebook cell's). Anything but a callable is returned as it is."""
    if not callable(obj) or isinstance(obj, str):
        return obj
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or not qualname.isidentifier():
        place = "" if qualname.isidentifier() else " (not at its top level)"
        raise RaykdError(f"{where}: {getattr(obj, '__name__', type(obj).__name__)!r} is defined "
                         f"in {module or 'no module'}{place}; raykd's Ray processes import a "
                         "source by name: put it at the top of a module file (my_models.py "
                         "beside your notebook) and pass it from there, or give "
                         "'my_models:function'")
    if module.startswith(("torchvision.models", "torchvision.datasets")):
        return f"torchvision:{qualname}"
    if module.startswith("timm.models"):
        return f"timm:{qualname}"
    try:
        same = getattr(importlib.import_module(module), qualname, None) is obj
    except ImportError:
        same = False
    if not same:
        raise RaykdError(f"{where}: {module}.{qualname} cannot be imported by that name, as "
                         "Ray's processes would; pass a module's top-level function")
    return f"{module}:{qualname}"


def named_sources(raw: dict) -> dict:
    """`raw` (a job as plain values) with every callable source replaced by its name."""
    for section, key in CALLABLE_FIELDS:
        part = raw.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part[key]
        if isinstance(value, list):
            part[key] = [source_name(v, f"{section}.{key}[{i}]") for i, v in enumerate(value)]
        else:
            part[key] = source_name(value, f"{section}.{key}")
    return raw
