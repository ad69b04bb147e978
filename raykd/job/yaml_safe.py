"""Reading YAML that a user (or anyone) wrote, without letting it exhaust the machine.

PyYAML's C loader where it is built (a 5 MB list parses in a fraction of a second, not a
minute), a key given twice in one mapping refused (plain YAML keeps the last silently), the text
capped at MAX_BYTES, and the document's size *with every alias expanded* capped at MAX_NODES
before anything is built from it: nested aliases (a "billion laughs" file of a few hundred bytes)
describe an exponentially large value, which raykd would otherwise copy, validate and quote in
an error until memory runs out.
"""
from __future__ import annotations

import yaml

from raykd.errors import RaykdError, one_line

MAX_BYTES = 1 << 20        # a job file is a few hundred bytes; a sweep's a few kilobytes
MAX_NODES = 100_000        # values in the document once aliases are expanded

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_Base):
    """The safe loader, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:     # an unhashable key: let the base loader report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def expanded_size(node, memo: dict | None = None) -> int:
    """How many values the node stands for once every alias is expanded (each shared node is
    counted once per reference, computed once)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def parse(text: str, where: str):
    """The document in `text` as plain values; one-line RaykdErrors naming `where`."""
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise RaykdError(f"{where}: larger than {MAX_BYTES // 1024} KiB; a job file is a few "
                         "hundred lines at most")
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = expanded_size(node)
        except RecursionError:
            raise RaykdError(f"{where}: nested too deeply") from None
        if size > MAX_NODES:
            raise RaykdError(f"{where}: its aliases expand to more than {MAX_NODES:,} values "
                             f"({size:,}); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RaykdError(f"{where}: not valid YAML ({one_line(e, first=True)})") from None
    finally:
        loader.dispose()
