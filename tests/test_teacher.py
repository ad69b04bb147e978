"""The teacher service: shard actors chained, replicas, faults, timeouts; and the feature cache."""
import json
import time
from pathlib import Path

import pytest
import ray
import torch

from raykd.data import load_dataset
from raykd.errors import RaykdError
from raykd.job.specs import DataSpec
from raykd.models import build_model
from raykd.models.export import save_export
from raykd.teacher import LocalTeacher
from raykd.teacher.cache import EntryWriter, FeatureCache, cache_key, cached_teacher
from raykd.teacher.service import TeacherClient, TeacherService, shard_name
from raykd.teacher.shard import partition_blocks

from test_models import ZOO


def _export(tmp_path, name="resnet8", channels=3, size=32, seed=0, classes=10):
    torch.manual_seed(seed)
    model = build_model(name, classes, channels, size).eval()
    path = tmp_path / f"{name}-{seed}.pt"
    save_export(model, path, classes, channels, size)
    return model, path


@pytest.mark.parametrize("name,channels,size,stages", ZOO, ids=[z[0] + f"-{z[2]}" for z in ZOO])
def test_every_model_chained_in_shard_ranges_equals_its_forward(name, channels, size, stages):
    # what each shard actor runs: a contiguous block range, fed the previous range's output
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size).eval()
    x = torch.randn(2, channels, size, size)
    taps = model.stage_names + ["logits"]
    with torch.no_grad():
        whole = model.features(x, taps)
        for shards in (1, 2, 3):
            ranges = partition_blocks(model, shards, (channels, size, size))
            assert ranges[0][0] == 0 and ranges[-1][1] == len(model.block_names)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and len(ranges) == shards
            h, got = x, {}
            for start, stop in ranges:
                got.update(model.features_from(h, taps, start, stop))
                h = model.run_blocks(h, start, stop)
            for tap in taps:
                assert torch.allclose(got[tap], whole[tap], atol=1e-6), (shards, tap)


FAMILIES = [("resnet8", 3, 32), ("wrn_16_2", 3, 32), ("cnn", 1, 28), ("resnet18", 3, 32)]


@pytest.mark.parametrize("name,channels,size", FAMILIES)
def test_actor_shard_chain_equals_the_whole_teacher(ray_session, tmp_path, name, channels, size):
    model, path = _export(tmp_path, name, channels, size)
    x = torch.randn(3, channels, size, size)
    taps = model.stage_names + ["logits"]
    with torch.no_grad():
        whole = model.features(x, taps)
    for shards in (1, 2, 3):
        service = TeacherService(f"chain-{name}-{shards}", str(path), (channels, size, size),
                                 shards=shards, cpus_per_shard=0.01)
        try:
            service.wait_ready()
            client = TeacherClient(service.handle)
            got = client.features(x, taps)
            assert set(got) == set(taps)
            for tap in taps:
                assert torch.allclose(got[tap], whole[tap], atol=1e-6), (shards, tap)
            # only what was asked for comes back
            assert set(client.features(x, ["stage2"])) == {"stage2"}
        finally:
            service.stop()


def test_replicas_share_the_load_and_agree(ray_session, tmp_path):
    model, path = _export(tmp_path)
    service = TeacherService("replicas", str(path), (3, 32, 32), shards=2, replicas=2,
                             cpus_per_shard=0.01)
    try:
        service.wait_ready()
        client = TeacherClient(service.handle)
        x = torch.randn(2, 3, 32, 32)
        outs = [client.features(x, ["logits"])["logits"] for _ in range(4)]
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert len({r for (r, _s) in client._actors}) == 2, "requests went to both replicas"
        with pytest.raises(RaykdError, match="unknown tap 'stage7'"):
            client.features(x, ["stage7"])
    finally:
        service.stop()


def _shard_pid(service: str, shard: int) -> int:
    from ray.util.state import list_actors

    name = shard_name(service, 0, shard)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                        filters=[("name", "=", name), ("state", "=", "ALIVE")])
                 if a.pid]
        if alive:
            return alive[0].pid
        time.sleep(0.2)
    raise AssertionError(f"{name} is not alive")


def _kill_during_request(client, x, service: str):
    """SIGKILL shard 1's process while a request is in flight; return the request's outcome."""
    import os
    import signal

    pending = client.submit(x, ["logits"])
    os.kill(_shard_pid(service, 1), signal.SIGKILL)
    return pending.result()


def test_a_shard_killed_during_a_request_is_recovered_by_rays_task_retry(ray_session, tmp_path):
    model, path = _export(tmp_path)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    # with Ray's task retries (the default) the request in flight completes with the right values
    service = TeacherService("faulty", str(path), (3, 32, 32), shards=2, cpus_per_shard=0.01)
    try:
        service.wait_ready()
        client = TeacherClient(service.handle)
        assert torch.allclose(client.features(x, ["logits"])["logits"], expected, atol=1e-5)
        got = _kill_during_request(client, x, "faulty")
        assert torch.allclose(got["logits"], expected, atol=1e-5)
        assert torch.allclose(client.features(x, ["logits"])["logits"], expected, atol=1e-5)
    finally:
        service.stop()
    # without them the same kill fails the request: nothing of raykd's own resends it
    service = TeacherService("noretry", str(path), (3, 32, 32), shards=2, cpus_per_shard=0.01,
                             task_retries=0)
    try:
        service.wait_ready()
        client = TeacherClient(service.handle)
        with pytest.raises(RaykdError, match="teacher service noretry: a shard actor died"):
            _kill_during_request(client, x, "noretry")
    finally:
        service.stop()


def test_a_shard_that_keeps_dying_ends_in_an_error_naming_the_service(ray_session, tmp_path):
    import os
    import signal

    from raykd.teacher.service import RESTARTS

    model, path = _export(tmp_path)
    service = TeacherService("dying", str(path), (3, 32, 32), shards=2, cpus_per_shard=0.01)
    try:
        service.wait_ready()
        client = TeacherClient(service.handle)
        for _ in range(RESTARTS + 1):   # every restart killed again, until Ray gives up
            os.kill(_shard_pid("dying", 1), signal.SIGKILL)
            time.sleep(0.5)
            try:
                ray.get(service.actors[1].ping.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
        started = time.monotonic()
        with pytest.raises(RaykdError, match="teacher service dying: a shard actor died"):
            client.features(torch.randn(2, 3, 32, 32), ["logits"])
        assert time.monotonic() - started < 30, "an error, not a hang"
    finally:
        service.stop()


def test_no_answer_ends_in_a_clear_error(ray_session, tmp_path):
    model, path = _export(tmp_path, "resnet32")
    service = TeacherService("slow", str(path), (3, 32, 32), cpus_per_shard=0.01, timeout_s=0.01)
    try:
        service.wait_ready()
        client = TeacherClient(service.handle)
        started = time.monotonic()
        with pytest.raises(RaykdError, match="teacher service slow: no answer within"):
            client.features(torch.randn(256, 3, 32, 32), ["logits"])
        assert time.monotonic() - started < 5
    finally:
        service.stop()


# ---- cache --------------------------------------------------------------------------------

class CountingTeacher(LocalTeacher):
    calls = 0

    def features(self, x, taps, index=None):
        CountingTeacher.calls += 1
        return super().features(x, taps)


def test_cache_miss_then_hit_then_invalidation(tmp_path):
    _, path = _export(tmp_path, "cnn", 1, 8)
    spec = DataSpec(dataset="digits", train_size=300)
    train = load_dataset(spec).train
    teacher = CountingTeacher(path)
    cache_dir = tmp_path / "cache"

    CountingTeacher.calls = 0
    first = cached_teacher(teacher, cache_dir, str(path), spec, "train", train,
                           ["stage2", "logits"], 128, log=lambda m: None)
    assert CountingTeacher.calls == 3          # 300 images / 128 per batch: computed once
    idx = torch.tensor([5, 0, 299])
    x = torch.stack([train[i][0] for i in idx])
    direct = teacher.features(x, ["stage2", "logits"])
    got = first.features(None, ["stage2", "logits"], idx)
    for tap in ("stage2", "logits"):
        assert torch.allclose(got[tap], direct[tap], atol=1e-5)

    CountingTeacher.calls = 0
    second = cached_teacher(teacher, cache_dir, str(path), spec, "train", train,
                            ["logits", "stage2"], 128, log=lambda m: None)
    assert CountingTeacher.calls == 0          # a hit: nothing recomputed
    assert torch.equal(second.stored["logits"], first.stored["logits"])

    # fewer taps of the same teacher, data and split: the wider entry serves them (only the
    # asked-for taps are read), nothing is recomputed and no second entry is written
    narrower = cached_teacher(teacher, cache_dir, str(path), spec, "train", train, ["logits"],
                              128, log=lambda m: None)
    assert CountingTeacher.calls == 0 and set(narrower.stored) == {"logits"}
    assert torch.equal(narrower.stored["logits"], first.stored["logits"])
    assert len(list(cache_dir.glob("*/manifest.json"))) == 1
    # another split is not served by it
    cached_teacher(teacher, cache_dir, str(path), spec, "val", load_dataset(spec).val,
                   ["logits"], 128, log=lambda m: None)
    assert CountingTeacher.calls > 0

    # a changed teacher, split or tap set is another key: never stale data
    _, other = _export(tmp_path, "cnn", 1, 8, seed=1)
    keys = {cache_key(str(path), spec, "train", ["logits", "stage2"]),
            cache_key(str(other), spec, "train", ["logits", "stage2"]),
            cache_key(str(path), DataSpec(dataset="digits", train_size=200), "train", ["logits", "stage2"]),
            cache_key(str(path), spec, "val", ["logits", "stage2"]),
            cache_key(str(path), spec, "train", ["logits"])}
    assert len(keys) == 5
    # batch size does not change the data, so it does not change the key
    assert cache_key(str(path), spec, "train", ["logits"]) == cache_key(
        str(path), DataSpec(dataset="digits", train_size=300, batch_size=7), "train", ["logits"])


def _run_to_the_end(processes: list) -> list:
    """Start the processes together and wait for each to exit cleanly."""
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    return processes


def _store_after(barrier, root: str, key: str, fill: float, rows: int, result) -> None:
    """A separate writer process: wait for the others, then store an entry."""
    cache = FeatureCache(root)
    barrier.wait()
    result.put(cache.store(key, {"feat": torch.full((rows, 64), fill)}))


def test_concurrent_writer_processes_leave_one_valid_entry(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for round_ in range(3):
        key = f"k{round_}"
        barrier, result = ctx.Barrier(2), ctx.Queue()
        writers = _run_to_the_end([ctx.Process(
            target=_store_after, args=(barrier, str(tmp_path), key, float(i + 1), 20000, result))
            for i in range(2)])
        assert sorted(result.get() for _ in writers) == [False, True]   # exactly one won
        feat = FeatureCache(tmp_path).load(key)["feat"]
        assert feat.shape == (20000, 64) and feat.unique().numel() == 1   # one writer's, whole
    assert not list(tmp_path.glob(".tmp-*"))   # the loser cleaned up after itself


def _fill_after(barrier, root: str, export: str, result) -> None:
    """A separate process missing the same entry as another: it fills it or waits and reads it."""
    spec = DataSpec(dataset="digits", train_size=300)
    teacher = CountingTeacher(export)
    barrier.wait()
    got = cached_teacher(teacher, root, export, spec, "train", load_dataset(spec).train,
                         ["logits", "stage2"], 128, log=lambda m: None)
    result.put((CountingTeacher.calls, float(got.stored["logits"].sum())))


def test_processes_missing_the_same_entry_at_once_compute_it_once(tmp_path):
    """Parts of one teacher start together and miss the same entry: one fills it (3 batches of
    the 300 images), the other waits on the entry's lock and reads what it wrote."""
    import multiprocessing as mp

    _, path = _export(tmp_path, "cnn", 1, 8)
    ctx = mp.get_context("spawn")
    barrier, result = ctx.Barrier(2), ctx.Queue()
    _run_to_the_end([ctx.Process(target=_fill_after,
                                 args=(barrier, str(tmp_path / "cache"), str(path), result))
                     for _ in range(2)])
    (calls_a, sum_a), (calls_b, sum_b) = result.get(), result.get()
    assert sorted([calls_a, calls_b]) == [0, 3] and sum_a == sum_b
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1


def _store_forever(root: str) -> None:
    FeatureCache(root).store("j", {"feat": torch.randn(400_000, 64)})


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    import multiprocessing as mp
    import os
    import signal
    import time

    writer = mp.get_context("spawn").Process(target=_store_forever, args=(str(tmp_path),))
    writer.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tmp-j-*/tap-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)   # mid-write: some parts on disk, no manifest
    writer.join()
    assert list(tmp_path.glob(".tmp-j-*")), "the writer was killed before it started writing"
    cache = FeatureCache(tmp_path)
    assert cache.load("j") is None            # a half-written entry is never served
    fresh = {"feat": torch.randn(10, 4)}
    assert cache.store("j", fresh) is True    # and does not block a later writer
    assert torch.equal(cache.load("j")["feat"], fresh["feat"])


def test_entries_are_memory_mapped_not_read_into_memory(tmp_path):
    """A 200 MB entry loads without 200 MB of this process's memory: reading a batch's rows
    touches only their pages; the rows come back exact."""
    import resource

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cache = FeatureCache(tmp_path)
    rows = 50_000
    writer = EntryWriter(cache, "big", rows)
    for lo in range(0, rows, 5_000):     # streamed in, never whole in memory
        writer.write(lo, {"feat": torch.arange(lo, lo + 5_000, dtype=torch.float32)
                          .repeat_interleave(1024).view(5_000, 1024)})
    assert writer.commit()
    before = rss_mb()
    feat = cache.load("big")["feat"]
    index = torch.tensor([3, 49_999, 20_000])
    batch = feat[index]
    assert feat.shape == (rows, 1024)
    assert torch.equal(batch[:, 0], index.float()) and torch.equal(batch[:, -1], index.float())
    assert rss_mb() - before < 50, "loading a 200 MB entry read it into memory"


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_cache_entry_is_discarded_and_recomputed_with_a_warning(tmp_path, caplog,
                                                                          damage):
    _, path = _export(tmp_path, "cnn", 1, 8)
    spec = DataSpec(dataset="digits", train_size=300)
    train = load_dataset(spec).train
    teacher = CountingTeacher(path)
    cache_dir = tmp_path / "cache"
    good = cached_teacher(teacher, cache_dir, str(path), spec, "train", train, ["logits"], 128,
                          log=lambda m: None).stored["logits"].clone()   # not the mapped file
    key = cache_key(str(path), spec, "train", ["logits"])
    entry = cache_dir / key
    part = entry / "tap-0.npy"
    data = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(data[: len(data) // 2])
    elif damage == "flip":       # same size, one byte changed: only the hash can tell
        middle = len(data) // 2
        part.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        (entry / "manifest.json").write_text("{not json")
    CountingTeacher.calls = 0
    with caplog.at_level("WARNING", logger="raykd"):
        again = cached_teacher(teacher, cache_dir, str(path), spec, "train", train, ["logits"],
                               128, log=lambda m: None)
    assert "is damaged" in caplog.text and "computing it again" in caplog.text
    assert CountingTeacher.calls == 3, "recomputed from the teacher"
    assert torch.allclose(again.stored["logits"], good, atol=1e-6)
    assert FeatureCache(cache_dir).load(key) is not None, "and stored again, intact"


def test_a_reader_maps_and_verifies_only_the_taps_it_reads(tmp_path, caplog):
    """An entry holding several taps (a neighbourhood partition's boundaries) serves a reader of
    a few of them without reading the others' bytes: damage in a tap it does not read goes
    unnoticed by it, and is caught by the first reader of that tap."""
    _, path = _export(tmp_path, "cnn", 1, 8)
    spec = DataSpec(dataset="digits", train_size=300)
    train = load_dataset(spec).train
    teacher = CountingTeacher(path)
    cache_dir, taps = tmp_path / "cache", ["stage2", "logits"]
    cached_teacher(teacher, cache_dir, str(path), spec, "train", train, taps, 128,
                   log=lambda m: None)
    entry = cache_dir / cache_key(str(path), spec, "train", taps)
    meta = json.loads((entry / "manifest.json").read_text())
    wide = entry / meta["taps"]["stage2"]
    data = wide.read_bytes()
    wide.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))     # same size: only its hash tells
    CountingTeacher.calls = 0
    with caplog.at_level("WARNING", logger="raykd"):
        few = cached_teacher(teacher, cache_dir, str(path), spec, "train", train, taps, 128,
                             log=lambda m: None, read=["logits"])
        assert set(few.stored) == {"logits"} and CountingTeacher.calls == 0
        assert "is damaged" not in caplog.text
        cached_teacher(teacher, cache_dir, str(path), spec, "train", train, taps, 128,
                       log=lambda m: None)
    assert "is damaged" in caplog.text and CountingTeacher.calls == 3, "recomputed"


def test_two_names_of_one_activation_are_stored_once(tmp_path):
    """A stage and the block it names (DIH heads read `stage2`, neighbourhood parts the block
    `stage2_block`, both from the entry their teacher stores) are one array on disk, read back
    under either name."""
    _, path = _export(tmp_path, "cnn", 1, 8)
    spec = DataSpec(dataset="digits", train_size=300)
    train = load_dataset(spec).train
    taps = ["stage2", "stage2_block", "logits"]
    stored = cached_teacher(LocalTeacher(path, "cpu"), tmp_path / "cache", str(path), spec,
                            "train", train, taps, 128, log=lambda m: None).stored
    entry = tmp_path / "cache" / cache_key(str(path), spec, "train", taps)
    assert len(list(entry.glob("*.npy"))) == 2, "stage2 and stage2_block share one file"
    assert torch.equal(stored["stage2"], stored["stage2_block"])
    x = torch.stack([train[i][0] for i in range(4)])
    expected = LocalTeacher(path, "cpu").features(x, ["stage2"])["stage2"]
    assert torch.allclose(stored["stage2_block"][:4], expected, atol=1e-6)


def test_stale_private_folders_of_killed_writers_are_removed(tmp_path):
    import os
    import time

    cache = FeatureCache(tmp_path)
    old, young = tmp_path / ".tmp-old-1", tmp_path / ".tmp-young-2"
    for folder in (old, young):
        folder.mkdir()
        (folder / "tap-0.npy").write_bytes(b"half")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    assert cache.remove_stale() == 1
    assert not old.exists() and young.exists(), "a live writer's folder is left alone"


def test_a_trained_teacher_stores_what_its_parts_and_heads_read_so_none_of_them_fills(
        tracked_run):
    """In the quickstart, each teacher stores its outputs on train, val and test (every boundary
    of the neighbourhood partition, the DIH heads' stages, its logits) as soon as it is trained:
    no neighbourhood part and no heads unit computes a cache entry, or waits on another's fill."""
    import re

    log = tracked_run.first.stdout + tracked_run.first.stderr
    for seed in (0, 1):
        assert re.search(rf"\[seed{seed}-teacher\] stored its outputs for the units that distil "
                         r"from it \(train, val, test: logits, stage1, stage1_block", log), \
            log[-3000:]
    assert re.search(r"\[seed0-nd-stage2-w0.5d1\] teacher cache hit \(val, ", log)
    misses = [line for line in log.splitlines() if "teacher cache miss" in line]
    assert not [line for line in misses if "-nd-" in line or "-heads" in line], misses
