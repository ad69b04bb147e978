"""Trained teachers shared across jobs: OUTPUT_DIR/teachers/DIGEST.pt and DIGEST.json.

A teacher is a function of its architecture, training settings, data settings, seed stream and
worker count; two jobs that ask for the same teacher (every sweep of the tuning study, a sweep
and the demo) train it once. The export is linked (or copied) into the job's own models folder
and the stored row is added to its results table with `reused_from` naming the store entry, so
a run folder stays self-contained and the feature cache (keyed by the export's content hash)
hits across jobs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from raykd.data import data_identity
from raykd.driver.units import Unit
from raykd.files import atomic_copy, atomic_write, file_hash
from raykd.log import log
from raykd.models.sources import fingerprint

STORE_DIR = "teachers"


def teacher_digest(unit: Unit, workers: int) -> str:
    """Everything that decides a trained teacher's weights (not where it is written)."""
    fields = {
        "model": unit.model, "method": unit.method_name, "params": unit.method,
        "optim": dataclasses.asdict(unit.optim), "data": data_identity(unit.data),
        "seed": unit.random_seed, "workers": workers}
    source = fingerprint(unit.model)
    if source or unit.model_args:   # a torchvision:/timm: model (zoo digests stay as they were)
        fields.update(model_args=unit.model_args, source=source)
    if unit.weights:                # trained on from these weights
        fields.update(weights=file_hash(unit.weights), weights_skip=unit.weights_skip)
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class TeacherStore:
    def __init__(self, root: str | Path, workers: int):
        self.root = Path(root)
        self.workers = workers

    def _paths(self, unit: Unit) -> tuple[Path, Path]:
        digest = teacher_digest(unit, self.workers)
        return self.root / f"{digest}.pt", self.root / f"{digest}.json"

    def fetch(self, unit: Unit) -> dict | None:
        """The stored row for this teacher with its export placed at the unit's export path, or
        None when the store has no intact entry (a missing or altered export is ignored)."""
        export, meta = self._paths(unit)
        if not (export.is_file() and meta.is_file()):
            return None
        try:
            stored = json.loads(meta.read_text())
        except ValueError:
            return None
        if stored.get("hash") != file_hash(export):
            log.warning("teacher store: %s does not match its record; training it again", export)
            return None
        target = atomic_copy(export, unit.export_path, link=True)
        return {**stored["row"], "unit": unit.key, "export": str(target),
                "reused_from": str(export)}

    def publish(self, unit: Unit, row: dict) -> None:
        """Store a freshly trained teacher (export first, then its record: a reader that sees
        the record finds the export)."""
        export, meta = self._paths(unit)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_copy(unit.export_path, export)
        record = {"row": {k: v for k, v in row.items() if k != "reused_from"},
                  "hash": file_hash(export)}
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, default=_plain)))


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)
