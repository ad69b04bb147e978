"""`TeacherShard`: a Ray actor holding a contiguous range of a frozen teacher's blocks."""
from __future__ import annotations

import warnings

import numpy as np
import ray
import torch
from torch import nn

from raykd.models import StagedModel, count_macs
from raykd.models.export import load_export
from raykd.models.staged import weights_checksum
from raykd.models.stitch import block_shapes
from raykd.teacher.local import freeze


def partition_blocks(model: StagedModel, shards: int, input_shape) -> list[tuple[int, int]]:
    """Cut the blocks into `shards` contiguous ranges of about equal compute (MACs)."""
    n = len(model.block_names)
    if shards > n:
        from raykd.errors import RaykdError
        raise RaykdError(f"teacher.shards={shards} but the teacher has only {n} blocks")
    macs = block_macs(model, input_shape)
    total = sum(macs) or 1
    ranges, start, acc = [], 0, 0.0
    for i, m in enumerate(macs):
        acc += m
        remaining_blocks = n - (i + 1)
        remaining_shards = shards - len(ranges) - 1
        if remaining_shards == 0:
            break
        # close this shard once it has its share, leaving a block for every later shard
        if acc >= total * (len(ranges) + 1) / shards or remaining_blocks == remaining_shards:
            ranges.append((start, i + 1))
            start = i + 1
    ranges.append((start, n))
    return ranges


def block_macs(model: StagedModel, input_shape) -> list[int]:
    """MACs of each block, each on the activation that enters it."""
    shapes = block_shapes(model, input_shape)
    return [count_macs(model.blocks[name], entering)
            for name, (entering, _) in zip(model.block_names, shapes)]


@ray.remote
class TeacherShard:
    """Frozen blocks [start, stop) of a teacher export, in eval mode, under no_grad.

    Arrays travel as numpy: Ray's object store hands those over without pickling.
    """

    def __init__(self, export_path: str, start: int, stop: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        # inputs arrive as read-only views of Ray's object store (zero-copy) and are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        model = load_export(export_path)
        names = model.block_names
        for i, name in enumerate(names):
            if not start <= i < stop:
                model.blocks[name] = nn.Identity()   # hold only this shard's weights
        use_cuda = torch.cuda.is_available() and len(ray.get_gpu_ids()) > 0
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = freeze(model).to(self.device)
        self.names = names[start:stop]
        self.start = start

    def forward(self, x: np.ndarray, taps: dict[str, int], pass_on: bool):
        """Run the shard on activation x; return (output if pass_on, {tap: array}).

        Called with num_returns=2, so the output's reference can go on to the next shard alone.
        """
        with torch.no_grad():
            return self._forward(torch.from_numpy(np.asarray(x)).to(self.device), taps, pass_on)

    def _forward(self, h: torch.Tensor, taps: dict[str, int], pass_on: bool):
        by_block: dict[int, list[str]] = {}
        for tap, idx in taps.items():
            by_block.setdefault(idx, []).append(tap)
        last = max(by_block) if (by_block and not pass_on) else self.start + len(self.names) - 1
        out: dict[str, np.ndarray] = {}
        for offset, name in enumerate(self.names):
            idx = self.start + offset
            if idx > last:
                break
            h = self.model.blocks[name](h)
            for tap in by_block.get(idx, ()):
                out[tap] = h.cpu().numpy().copy()   # later blocks must not alias it
        return (h.cpu().numpy() if pass_on else None), out

    def ping(self) -> bool:
        return True

    def checksum(self) -> str:
        """Of this shard's own blocks, as it holds them."""
        return weights_checksum(self.model)
