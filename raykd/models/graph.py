"""Any `nn.Module` as a staged model: traced with torch.fx and cut into contiguous blocks.

A *cut point* is a place in the forward pass where one module has just produced its output and
nothing computed before is needed after it: exactly one tensor crosses. raykd cuts at the end of
every module one or two levels down the model's tree (`layer1`, `layer1.0`, `features.3`,
`blocks.5`) where that holds, so each block runs the code between two cut points, and the output
of the block that ends where module `layer3.1` ends is the tap `layer3.1`. Blocks are named
after the deepest module ending at their cut (dots become underscores, as a module name cannot
hold a dot); every module path ending there is an alias of that block.

Stages (`stage1..stageN`, the taps DIH and Channel Distillation address) are the model's own
where it says (timm's `feature_info`, or `stages` given by module path), else the last block at
each spatial resolution of its feature maps (the blocks before each downsampling, and the last
feature map).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from raykd.errors import RaykdError, one_line
from raykd.models.staged import LOGITS, StagedModel, mode

MAX_DEPTH = 2   # cut at the end of modules this deep in the model's tree (or stage modules)


def trace(module: nn.Module, name: str) -> torch.fx.GraphModule:
    """The forward pass as a graph, on one input: every other argument fixed to its default
    (an attention mask left None), so that only the image flows through the cuts."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in params
             if p.default is not inspect.Parameter.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        return torch.fx.symbolic_trace(module, concrete_args=fixed or None)
    except Exception as e:   # data-dependent control flow, untraceable Python
        raise RaykdError(f"model {name}: torch.fx cannot trace it ({one_line(e)}); raykd cuts a "
                         "model into blocks by tracing its forward pass") from None


def module_ends(nodes: list) -> dict[str, int]:
    """Module path -> the index of the last graph node computed inside it."""
    ends: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                ends[path] = i
        if node.op == "call_module":
            ends[str(node.target)] = i
    return ends


def single_crossings(nodes: list) -> set[int]:
    """Indices i after which exactly one value, node i's own output, is used later (parameters
    read with get_attr do not count: each block keeps its own)."""
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {}
    for node in nodes:
        users = [index[u] for u in node.users if u.op != "output"]
        if any(u.op == "output" for u in node.users):
            users.append(len(nodes))
        last_use[node] = max(users, default=index[node])
    out = set()
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        crossing = [n for n in nodes[:i + 1] if n.op != "get_attr" and last_use[n] > i]
        if crossing == [node]:
            out.add(i)
    return out


def cut_points(nodes: list, stage_paths: list[str]) -> "OrderedDict[int, list[str]]":
    """Node index -> the module paths that end there (deepest first), for every module end that
    is a cut point: modules at most MAX_DEPTH deep, and the stage modules whatever their depth."""
    ends = module_ends(nodes)
    crossings = single_crossings(nodes)
    wanted = {p for p in ends if p.count(".") < MAX_DEPTH} | set(stage_paths)
    missing = [p for p in stage_paths if p not in ends]
    if missing:
        raise RaykdError(f"no module {missing[0]!r} in the model's forward pass; module paths "
                         f"there include {', '.join(sorted(ends, key=ends.get)[:12])}")
    points: dict[int, list[str]] = {}
    for path in wanted:
        if ends[path] in crossings:
            points.setdefault(ends[path], []).append(path)
    bad = [p for p in stage_paths if ends[p] not in crossings]
    if bad:
        raise RaykdError(f"cannot cut the model after {bad[0]!r}: more than one tensor crosses "
                         "that point (a skip connection around it)")
    last = max(i for i, n in enumerate(nodes) if n.op not in ("output",))
    points.setdefault(last, [])
    return OrderedDict(sorted((i, sorted(p, key=lambda s: (-s.count("."), s)))
                              for i, p in points.items()))


def split(gm: torch.fx.GraphModule, root: nn.Module, points) -> list[nn.Module]:
    """The traced model as one GraphModule per segment between cut points, each taking the
    previous segment's output (the first, the model's input). A segment reads the parameters it
    uses by name from `root`, as the whole model did (shared, not copied)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    bounds = list(points)
    segments, start = [], 0
    for k, stop in enumerate(bounds):
        graph, env = torch.fx.Graph(), {}
        body = nodes[start:stop + 1]
        if k == 0:
            entry = None
        else:
            entry = nodes[start - 1]
            env[entry] = graph.placeholder("x")
        for node in body:
            for arg in node.all_input_nodes:   # a parameter defined earlier, read here
                if arg not in env and arg.op == "get_attr":
                    env[arg] = graph.node_copy(arg, env.__getitem__)
            env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[body[-1]])
        segments.append(torch.fx.GraphModule(root, graph, class_name=f"Segment{k}"))
        start = stop + 1
    return segments


def block_name(paths: list[str], k: int) -> str:
    return paths[0].replace(".", "_") if paths else f"block{k}"


def cut_module(module: nn.Module, input_shape, name: str,
               stage_paths: list[str] | None = None) -> StagedModel:
    """`module` as a staged model whose blocks are its cut segments (same parameters, same
    computation); stages from `stage_paths` (module paths) or from the feature maps' resolutions."""
    module = module.eval()
    gm = trace(module, name)
    nodes = list(gm.graph.nodes)
    points = cut_points(nodes, list(stage_paths or []))
    segments = split(gm, module, points)
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    aliases: dict[str, str] = {}
    for k, ((_, paths), segment) in enumerate(zip(points.items(), segments)):
        key = block_name(paths, k)
        blocks[key] = segment
        aliases.update({p: key for p in paths})
    staged = StagedModel(blocks, {}, aliases)
    check_same(module, staged, input_shape, name)
    if stage_paths:
        stages = {f"stage{i + 1}": aliases[p] for i, p in enumerate(stage_paths)}
    else:
        stages = resolution_stages(staged, input_shape)
    staged.stages = stages
    return staged


def resolution_stages(model: StagedModel, input_shape) -> dict[str, str]:
    """The last block at each spatial resolution of the model's feature maps, in order (the
    logits block excluded)."""
    names = model.block_names[:-1]
    with mode(model, False), torch.no_grad():
        feats = model.features(torch.zeros(1, *input_shape), names)
    last_at: "OrderedDict[tuple, str]" = OrderedDict()
    for block in names:
        shape = tuple(feats[block].shape)
        if len(shape) == 4 and shape[2:] != (1, 1):   # a map, not a pooled vector
            last_at[shape[2:]] = block
    return {f"stage{i + 1}": b for i, b in enumerate(last_at.values())}


def check_same(module: nn.Module, staged: StagedModel, input_shape, name: str) -> None:
    """The blocks in order compute what the model computes (else the cut is not honest)."""
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with mode(module, False), mode(staged, False), torch.no_grad():
        want, got = module(x), staged(x)
    if not torch.is_tensor(want) or want.shape != got.shape or not torch.allclose(
            want, got, rtol=1e-4, atol=1e-5):
        raise RaykdError(f"model {name}: its blocks, run in order, do not reproduce its output; "
                         "it cannot be cut into a chain")


__all__ = ["LOGITS", "cut_module"]
