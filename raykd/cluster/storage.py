"""Shared storage on a multi-node cluster: every node must see what the driver writes.

Rows, exports and checkpoints are written by Ray Train workers on whatever node runs them and
read by the driver; a node whose `output_dir` is its own local disk would lose them. Before any
run starts, a tiny task pinned to each alive node reads a marker the driver wrote and writes its
own answer beside it, which the driver must then see.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from raykd.errors import RaykdError
from raykd.log import log

CHECK_DIR = ".raykd-storage-check"


def check_shared_storage(folder: str | Path, timeout_s: float = 120.0) -> int:
    """Raise a one-line error naming the nodes that cannot share `folder`; return how many
    nodes were checked (0 on a single-node instance, where there is nothing to check)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return 0
    nonce = uuid.uuid4().hex
    marker = Path(folder) / CHECK_DIR / nonce
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(nonce)

    @ray.remote(num_cpus=0)
    def probe(path: str, expected: str, node_id: str) -> bool:
        from pathlib import Path as _Path

        seen = _Path(path)
        if not (seen.is_file() and seen.read_text() == expected):
            return False
        seen.with_name(f"{seen.name}.{node_id}").write_text(node_id)
        return True

    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(marker), nonce, n["NodeID"]) for n in nodes}
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise RaykdError(f"checking that every node reaches {folder} took over {timeout_s:g} s; "
                         "is a node unable to run tasks?") from None
    blind = [n for n in nodes if not answers[n["NodeID"]] or not
             marker.with_name(f"{marker.name}.{n['NodeID']}").is_file()]
    for path in marker.parent.glob(f"{nonce}*"):
        path.unlink(missing_ok=True)
    if blind:
        names = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in blind)
        raise RaykdError(f"output_dir {folder} is not shared with node(s) {names}: what runs "
                         "there would be lost; mount the same storage at the same path on every "
                         "node (docs/cluster.md)")
    log.info("shared storage: all %d nodes read and write %s", len(nodes), folder)
    return len(nodes)
