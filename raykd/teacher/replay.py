"""Replayed teacher views: KD on augmented data without a teacher forward per step.

After FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", 2022):
once per teacher, `teacher.replay.views` (K) augmented views of every training image are drawn
and the teacher's class scores on each are stored; students then train on those exact views, one
per image per epoch, and read the teacher's scores from the store. Teacher and student see the
same view (Beyer et al. 2022: a teacher fixed on one view per image hurts).

- **A view's parameters are its generator seed.** Every augmented training image is drawn from a
  generator seed of (stream, view, image) alone (raykd.train.batches.SeededSamples seeds torch's,
  Python's and NumPy's generators with it), so the seed reproduces exactly what the job's random
  transforms drew, whatever they are (crop box, flip, a factory's own transforms), bit for bit;
  the store's key holds the data spec (transforms included), raykd's augmentation recipes, the
  torch and torchvision versions, K, k and the stream.
- **What is stored per view**, for each class-score output a method reads (`method.teacher_scores`:
  the teacher's logits, DIH's heads): the k largest log-probabilities (float16; log-probabilities,
  not probabilities, because float16 flushes probabilities under 6e-8 to zero, which a
  temperature of 4 would raise to 0.016), their classes, the label's log-probability and the
  log of the probability the other classes hold (computed in float32); the label once.
  (4k + 4) bytes per output plus 2 per view: K = 8, k = 10 is 368 bytes per image.
- **What a student reads back**: log-probabilities over every class, the stored ones exact and the
  remaining mass spread evenly over the other classes. Methods take them as logits:
  softmax(log p / T) is softmax(z / T) for the stored classes, so any temperature applies; with
  k = the number of classes the teacher is reproduced exactly (to float16).
- **The fill** runs on a trained teacher's own lane for the students that replay its logits (kd,
  dkd: raykd.driver.plan asks for it, as for the teacher's other stored outputs), else where a student
  first needs the entry (a DIH student, whose heads train after the teacher; a
  `teacher.checkpoint`: the first of its students, the others wait on its lock and read it), one
  pass over the training split per view with teacher batches in flight, each view's
  arrays committed to a resumable folder as it finishes: a killed fill resumes at the view it was
  on. The entry then goes into the teacher cache's atomic, checksummed store (raykd.teacher.cache):
  a damaged entry is detected, discarded and filled again.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from raykd.errors import RaykdError
from raykd.files import file_hash
from raykd.log import log
from raykd.teacher.cache import EntryWriter, FeatureCache, cache_key, source_key
from raykd.teacher.local import Done
from raykd.train.batches import SeededSamples

LABEL = "label"
AHEAD = 4           # teacher batches a fill keeps in flight


def view_of(seed: int, epoch: int, index, views: int):
    """The stored view image `index` trains on at `epoch` (int or int64 tensor): each image
    cycles through its K views from a starting view of its own (from the student's seed), so K
    epochs see every view once and images differ in which view they see together. Python ints
    and int64 tensors give the same answer: no intermediate value exceeds 2^52."""
    start = (((seed % 65_521) * 1_000_003 + index) * 40_503) >> 5
    return (start + epoch) % views


class ReplayedViews(SeededSamples):
    """The training split as a replaying student sees it: at each epoch, image i is stored view
    `view_of(student_seed, epoch, i)`, drawn exactly as the fill drew it."""

    def __init__(self, dataset, replay, student_seed: int):
        super().__init__(dataset, replay.seed)
        self.replay, self.views, self.student_seed = replay, replay.views, student_seed

    def __getitem__(self, i):
        return self.draw(i, int(view_of(self.student_seed, self.epoch, int(i), self.views)))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The store's rows (view-major: view v of image i is row v * N + i) of this epoch's
        views of images `index`."""
        index = index.long()
        return view_of(self.student_seed, self.epoch, index, self.views) * len(self) + index


def score_taps(name: str) -> tuple[str, str, str, str]:
    """The stored arrays of one class-score output: top-k log-probabilities, their classes,
    the label's log-probability, and the log of the probability left to the other classes."""
    return f"{name}.topk", f"{name}.classes", f"{name}.label", f"{name}.rest"


def replay_key(export_path: str, data_spec, replay, names: list[str], inputs: list[str]) -> str:
    """The store entry of (teacher, data and its transforms, K, k, stream, outputs). `inputs`:
    other files the outputs are computed with (a DIH student's heads)."""
    import torchvision

    from raykd.data import augment

    what = ["replay", f"views={replay.views}", f"topk={replay.topk}", f"seed={replay.seed}",
            f"torch={torch.__version__}", f"torchvision={torchvision.__version__}",
            f"recipes={file_hash(augment.__file__)}",    # raykd's own augmentation presets
            *[f"scores={n}" for n in names], *[f"input={file_hash(p)}" for p in sorted(inputs)]]
    return cache_key(export_path, data_spec, "train", what)


def known_classes(classes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Which classes a view stores (its top k and its label), as a batch x classes mask."""
    known = torch.zeros(len(classes), num_classes, dtype=torch.bool, device=classes.device)
    known.scatter_(1, classes.long(), True)
    known[torch.arange(len(classes), device=classes.device), labels.long()] = True
    return known


def class_scores(topk: torch.Tensor, classes: torch.Tensor, label_logp: torch.Tensor,
                 rest: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Log-probabilities over all classes from a view's stored ones: exact where stored (the
    top k and the label), the rest's stored mass (its log, `rest`) spread evenly over the
    other classes. The rest is stored, not taken as 1 minus the stored probabilities: a
    confident teacher's top log-probability rounds to 0 in float16, which would leave nothing."""
    rows = torch.arange(len(topk), device=topk.device)
    logp = torch.zeros(len(topk), num_classes, device=topk.device)
    logp.scatter_(1, classes.long(), topk.float())
    logp[rows, labels.long()] = label_logp.float()
    known = known_classes(classes, labels, num_classes)
    each = rest.float() - (~known).sum(1).clamp_min(1).float().log()
    return torch.where(known, logp, each[:, None].expand_as(logp))


class ReplayedTeacher:
    """The `Teacher` interface over a replay entry: the class scores of this epoch's view of
    each image (its rows from `views`), under the names the method reads them by."""

    def __init__(self, model, stored: dict[str, torch.Tensor], views: ReplayedViews,
                 num_classes: int, device):
        self.model, self.stored, self.views = model, stored, views
        self.num_classes, self.device = num_classes, torch.device(device)

    def features(self, x, taps, index=None) -> dict[str, torch.Tensor]:
        if index is None:
            raise ValueError("a replayed teacher needs the batch's sample indices")
        rows = self.views.rows(index)
        labels = self.stored[LABEL][rows]
        out = {}
        for name in taps:
            out[name] = class_scores(*(self.stored[t][rows] for t in score_taps(name)), labels,
                                     self.num_classes).to(self.device)
        return out

    def submit(self, x, taps, index=None) -> Done:
        return Done(self.features(x, taps, index))


def view_scores(scores: dict[str, torch.Tensor], labels: torch.Tensor, k: int,
                num_classes: int) -> dict[str, torch.Tensor]:
    """What a view stores: per output its top-k log-probabilities (float16), their classes, the
    label's log-probability and the log of what the other classes hold (computed in float32;
    floored at e^-60 so that a loss never meets log 0); and the label."""
    index_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
    out = {LABEL: labels.to(index_dtype)}
    for name, logits in scores.items():
        logp = F.log_softmax(logits.float(), dim=1)
        top, classes = logp.topk(min(k, num_classes), dim=1)
        known = known_classes(classes, labels, num_classes)
        rest = torch.logsumexp(logp.masked_fill(known, float("-inf")), dim=1).clamp_min(-60.0)
        tap_topk, tap_classes, tap_label, tap_rest = score_taps(name)
        out[tap_topk] = top.half()
        out[tap_classes] = classes.to(index_dtype)
        out[tap_label] = logp.gather(1, labels.long()[:, None])[:, 0].half()
        out[tap_rest] = rest.half()
    return out


def spread_mass(arrays: dict[str, torch.Tensor], name: str = "logits") -> float:
    """The mean probability the stored classes (top k and label) leave to be spread evenly."""
    if f"{name}.rest" not in arrays:
        name = next(n for n in arrays if n.endswith(".rest"))[:-len(".rest")]
    return float(arrays[f"{name}.rest"].float().exp().mean())


def in_flight(teacher, taps: list[str], loader, ahead: int = AHEAD):
    """(labels, teacher outputs) of each batch in order, with `ahead` batches submitted before
    one is read: a teacher served by several shard-actor replicas works on them at once (an
    in-process teacher has computed each by the time `submit` returns)."""
    pending: deque = deque()
    for x, y in loader:
        pending.append((y, teacher.submit(x, taps)))
        if len(pending) > ahead:
            labels, job = pending.popleft()
            yield labels, job.result()
    while pending:
        labels, job = pending.popleft()
        yield labels, job.result()


class ReplayFill:
    """Fills one replay entry, one view (a pass over the training split) at a time; each finished
    view's arrays are saved to `.replay-KEY/` (atomically, file by file), so a fill killed
    mid-way resumes at the view it was on."""

    def __init__(self, cache: FeatureCache, key: str, train, replay, num_classes: int):
        self.cache, self.key, self.train, self.replay = cache, key, train, replay
        self.num_classes = num_classes
        self.partial = cache.root / f".replay-{key}"

    def view_files(self, view: int) -> Path:
        return self.partial / f"view-{view:05d}.json"

    def done_views(self) -> list[int]:
        """The views a previous fill saved whole; one whose files do not load with a row per
        image (torn by a machine's crash) is computed again."""
        done = []
        for view in range(self.replay.views):
            listing = self.view_files(view)
            if not listing.exists():
                continue
            try:
                files = json.loads(listing.read_text())
                whole = all(len(np.load(self.partial / f, mmap_mode="r", allow_pickle=False))
                            == len(self.train) for f in files.values())
            except (OSError, ValueError):
                whole = False
            if whole:
                done.append(view)
            else:
                listing.unlink(missing_ok=True)
        return done

    def run(self, teacher, taps: list[str], scores_of, batch_size: int, loader_workers: int,
            say=log.info) -> None:
        """`scores_of(teacher outputs) -> {name: class scores}`: the method's teacher_scores."""
        self.partial.mkdir(parents=True, exist_ok=True)
        samples = SeededSamples(self.train, self.replay.seed)
        done = set(self.done_views())
        if done:
            say(f"replay fill {self.key}: resuming, {len(done)} of {self.replay.views} views "
                "stored")
        for view in range(self.replay.views):
            if view in done:
                continue
            started = time.perf_counter()
            samples.set_epoch(view)
            parts: dict[str, list[torch.Tensor]] = {}
            loader = DataLoader(samples, batch_size=batch_size, shuffle=False,
                                num_workers=loader_workers)
            for labels, outputs in in_flight(teacher, taps, loader):
                with torch.no_grad():
                    scores = scores_of(outputs)
                for name, t in view_scores(scores, labels, self.replay.topk,
                                           self.num_classes).items():
                    parts.setdefault(name, []).append(t.cpu())
            arrays = {name: torch.cat(ts) for name, ts in parts.items()}
            self.save_view(view, arrays)
            say(f"replay fill {self.key}: view {view + 1}/{self.replay.views} "
                f"({len(self.train)} images, {time.perf_counter() - started:.1f}s; "
                f"{100 * spread_mass(arrays):.2f}% of the teacher's probability "
                "is outside the stored classes, spread evenly)")

    def save_view(self, view: int, arrays: dict[str, torch.Tensor]) -> None:
        files = {}
        for i, (name, t) in enumerate(arrays.items()):
            path = self.partial / f"view-{view:05d}-{i}.npy"
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, t.numpy())
            os.replace(tmp, path)
            files[name] = path.name
        tmp = self.view_files(view).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(files))
        os.replace(tmp, self.view_files(view))    # the view counts as stored from here on

    def commit(self, source: str, filled_by: str = "") -> None:
        """The views, in order, into one checksummed entry; the resumable folder goes."""
        n = len(self.train)
        writer = EntryWriter(self.cache, self.key, n * self.replay.views, source, filled_by)
        try:
            for view in range(self.replay.views):
                files = json.loads(self.view_files(view).read_text())
                writer.write(view * n, {name: torch.from_numpy(
                    np.load(self.partial / f, allow_pickle=False)) for name, f in files.items()})
        except BaseException:
            writer.abandon()
            raise
        writer.commit()
        shutil.rmtree(self.partial, ignore_errors=True)


class TeacherLogits:
    """The scores of a method that distils the teacher's logits alone (kd, dkd): what a trained
    teacher's own lane stores for its replaying students, before any of them starts."""
    name = "teacher"

    def score_names(self) -> list[str]:
        return ["logits"]

    def teacher_taps(self) -> list[str]:
        return ["logits"]

    def teacher_scores(self, teacher: dict) -> dict:
        return {"logits": teacher["logits"]}


def replayed_teacher(handle, model, open_online, method, data_spec, views: ReplayedViews,
                     num_classes: int, inputs: list[str], device, say=log.info,
                     filled_by: str = "") -> ReplayedTeacher:
    """The replay entry of one teacher (`model`: its architecture) for this student's method,
    filled first if absent by the online teacher `open_online()`, opened only then. `inputs`:
    other files the method's scores are computed with (a DIH student's heads). `filled_by`: the
    unit filling it, recorded in the entry's manifest."""
    names = method.score_names()
    if not names:
        raise RaykdError(replay_refusal(method.name))
    replay = views.replay
    cache = FeatureCache(handle.cache_dir)
    cache.remove_stale()
    key = replay_key(handle.export_path, data_spec, replay, names, inputs)
    wanted = [LABEL, *[t for n in names for t in score_taps(n)]]
    stored = cache.load(key, wanted)
    if stored is not None:
        say(f"replay store hit: {key}")
        # a fill killed between putting its entry in place and removing its views (no fill of
        # a stored entry can be running: a fill holds the lock from its miss to its commit)
        shutil.rmtree(cache.root / f".replay-{key}", ignore_errors=True)
    else:
        with cache.filling(key):
            stored = cache.load(key, wanted)    # filled by another process while this one waited
            if stored is None:
                say(f"replay store miss: drawing {replay.views} views of {len(views)} images and "
                    f"storing the teacher's top-{replay.topk} ({key})")
                fill = ReplayFill(cache, key, views.dataset, replay, num_classes)
                fill.run(open_online(), method.teacher_taps(), method.teacher_scores,
                         data_spec.eval_batch_size, data_spec.loader_workers, say)
                fill.commit(source_key(handle.export_path, data_spec, "train"), filled_by)
                stored = cache.load(key, wanted)
            if stored is None:
                raise RuntimeError(f"replay entry {key} could not be read back after writing")
    return ReplayedTeacher(model, stored, views, num_classes, device)


def replay_refusal(method: str) -> str:
    return (f"teacher.replay: method {method} reads the teacher's features, which a replay does "
            "not store (it stores class scores: kd, dkd, dist, dih); drop teacher.replay "
            "or this method from the job")
