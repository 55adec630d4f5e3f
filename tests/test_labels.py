"""Labelled shards belong to one teacher: labels from another teacher are refused before training."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.data.labelled import LABEL_COLUMNS, Labels, check_teacher, open_labelled, read_labels, write_labels
from pipeline.distill.objective import teacher_targets


def test_labels_round_trip_and_a_stale_teacher_is_refused(tmp_path):
    labels = Labels(teacher_hash="aaaa", source_content_hash="cccc", num_layers=2, semantic_dim=3,
                    action_dim=4, num_rows=10)
    write_labels(str(tmp_path), labels)
    assert read_labels(str(tmp_path)) == labels
    check_teacher(labels, "aaaa", str(tmp_path))
    with pytest.raises(ValueError, match="made by teacher aaaa.*checkpoint is bbbb.*probe-teacher"):
        check_teacher(labels, "bbbb", str(tmp_path))


def test_missing_labels_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.json.*actdistill probe-teacher"):
        read_labels(str(tmp_path))


def test_rows_are_matched_to_their_own_targets_and_foreign_rows_refused():
    batch = {"teacher_hash": np.array(["aaaa", "aaaa"]),
             "teacher_sem": np.arange(12, dtype=np.float32).reshape(2, 6),   # 2 layers x 3
             "teacher_act": np.arange(16, dtype=np.float32).reshape(2, 8),   # 2 layers x 4
             "teacher_action": np.arange(8, dtype=np.float32).reshape(2, 4)}
    sem, act, action = teacher_targets(batch, "aaaa", layers=2)
    assert sem.shape == (2, 2, 3) and act.shape == (2, 2, 4) and action.shape == (2, 4)
    assert sem[1, 0].tolist() == [3.0, 4.0, 5.0]        # layer 1 of row 0
    assert action[1].tolist() == [4.0, 5.0, 6.0, 7.0]   # row 1's own teacher action
    batch["teacher_hash"] = np.array(["aaaa", "zzzz"])
    with pytest.raises(ValueError, match="zzzz"):
        teacher_targets(batch, "aaaa", layers=2)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _labelled_file(path, episode, rows, columns=LABEL_COLUMNS):
    data = {"episode_id": [episode] * rows, "step": list(range(rows)), "teacher_hash": ["aaaa"] * rows,
            "teacher_sem": np.ones((rows, 6), np.float32).tolist(),
            "teacher_act": np.ones((rows, 8), np.float32).tolist(),
            "teacher_action": np.ones((rows, 4), np.float32).tolist()}
    pq.write_table(pa.table({c: data[c] for c in columns}), path)


@pytest.mark.slow
def test_labelled_rows_are_read_and_filtered_by_episode(tmp_path, ray_local):
    _labelled_file(tmp_path / "a.parquet", "e/a", 5)
    _labelled_file(tmp_path / "b.parquet", "e/b", 3)
    write_labels(str(tmp_path), Labels(teacher_hash="aaaa", source_content_hash="c", num_layers=2, semantic_dim=3,
                                       action_dim=4, num_rows=8))
    assert open_labelled(str(tmp_path)).count() == 8
    assert open_labelled(str(tmp_path), cache=False).count() == 8
    rows = open_labelled(str(tmp_path), episodes={"e/b"}).take_all()
    assert sorted(r["step"] for r in rows) == [0, 1, 2] and {r["episode_id"] for r in rows} == {"e/b"}


@pytest.mark.slow
def test_labelled_folder_without_labels_or_columns_is_refused(tmp_path, ray_local):
    with pytest.raises(FileNotFoundError, match=r"holds no labelled shards.*actdistill probe-teacher"):
        open_labelled(str(tmp_path))
    _labelled_file(tmp_path / "a.parquet", "e/a", 2, columns=LABEL_COLUMNS[:3])
    with pytest.raises(ValueError, match=r"a\.parquet: labelled shards lack column\(s\) "
                                         r"\['teacher_sem', 'teacher_act', 'teacher_action'\]"):
        open_labelled(str(tmp_path))
