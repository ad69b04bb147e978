"""The shared teacher store: entries keyed by everything that decides a teacher's weights."""
import dataclasses

from raykd.driver.units import Unit
from raykd.files import file_hash
from raykd.job.specs import DataSpec, OptimSpec
from raykd.teacher.store import TeacherStore, teacher_digest


def teacher_unit(tmp_path, name="a", **kw):
    return Unit(key="seed0-teacher", role="teacher", label="ce", model="cnn", optim=OptimSpec(),
                data=DataSpec(dataset="digits"), seed=0, method_name="ce",
                export_path=str(tmp_path / name / "models" / "seed0-teacher.pt"), **kw)


def test_digest_follows_what_decides_the_weights_not_where_they_go(tmp_path):
    unit = teacher_unit(tmp_path)
    moved = dataclasses.replace(unit, export_path=str(tmp_path / "elsewhere.pt"))
    assert teacher_digest(unit, 1) == teacher_digest(moved, 1)
    for changed in (dataclasses.replace(unit, seed=1), dataclasses.replace(unit, model="cnn_wide"),
                    dataclasses.replace(unit, optim=OptimSpec(epochs=3)),
                    dataclasses.replace(unit, data=DataSpec(dataset="digits", train_size=100))):
        assert teacher_digest(changed, 1) != teacher_digest(unit, 1)
    assert teacher_digest(unit, 2) != teacher_digest(unit, 1)


def test_publish_then_fetch_places_the_same_export_and_row(tmp_path):
    store = TeacherStore(tmp_path / "teachers", workers=1)
    first = teacher_unit(tmp_path, "a")
    (tmp_path / "a" / "models").mkdir(parents=True)
    (tmp_path / "a" / "models" / "seed0-teacher.pt").write_bytes(b"weights")
    assert store.fetch(first) is None
    store.publish(first, {"unit": first.key, "val_top1": 0.9, "export": first.export_path})
    second = teacher_unit(tmp_path, "b")
    row = store.fetch(second)
    assert row["val_top1"] == 0.9 and row["export"] == second.export_path
    assert file_hash(second.export_path) == file_hash(first.export_path)
    assert row["reused_from"].endswith(".pt")


def test_an_altered_store_entry_is_not_served(tmp_path):
    store = TeacherStore(tmp_path / "teachers", workers=1)
    unit = teacher_unit(tmp_path, "a")
    (tmp_path / "a" / "models").mkdir(parents=True)
    (tmp_path / "a" / "models" / "seed0-teacher.pt").write_bytes(b"weights")
    store.publish(unit, {"unit": unit.key, "val_top1": 0.9})
    stored = next((tmp_path / "teachers").glob("*.pt"))
    stored.write_bytes(b"truncat")
    assert store.fetch(teacher_unit(tmp_path, "b")) is None


def test_editing_your_own_model_or_data_file_misses_the_store_and_the_cache(tmp_path,
                                                                           monkeypatch):
    """A teacher of a factory model, on data of a factory, is keyed by the factories' files: an
    edited file misses the teacher store and the teacher-output cache, an unchanged one hits."""
    import sys

    from raykd.job import factories
    from raykd.teacher.cache import cache_key

    module = tmp_path / "mine_store.py"
    module.write_text("def build(num_classes):\n    return None\n"
                      "def splits():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    factories.allow(["mine_store:build", "mine_store:splits"])
    unit = dataclasses.replace(teacher_unit(tmp_path), model="mine_store:build",
                               data=DataSpec(dataset="mine_store:splits"))
    export = tmp_path / "teacher.pt"
    export.write_bytes(b"weights")

    def keys():
        return teacher_digest(unit, 1), cache_key(str(export), unit.data, "train", ["logits"])

    before = keys()
    assert keys() == before, "unchanged: the same entries"
    module.write_text(module.read_text() + "# edited\n")
    sys.modules.pop("mine_store", None)
    after = keys()
    assert after[0] != before[0], "the edited model file trains a new teacher"
    assert after[1] != before[1], "the edited data file fills a new cache entry"
