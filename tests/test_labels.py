"""Labelled shards belong to one teacher: labels from another teacher are refused before training."""

import numpy as np
import pytest

from pipeline.data.labelled import Labels, check_teacher, read_labels, write_labels
from pipeline.distill.loop import StudentJob, Tracking, _teacher_targets
from pipeline.config import TrainSection
from pipeline.distill.losses import LossWeights


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


def _job(teacher_hash):
    return StudentJob(teacher_uri="t", teacher_hash=teacher_hash, probes_uri="p", router_hidden=8, threshold=0.5,
                      gate="straight_through", anneal_to=0.05, weights=LossWeights(), train=TrainSection(), image_shape=(8, 8, 3),
                      meta={}, tracking=Tracking("sqlite://", "r"), seed=0)


def test_rows_are_matched_to_their_own_targets_and_foreign_rows_refused():
    batch = {"teacher_hash": np.array(["aaaa", "aaaa"]),
             "teacher_sem": np.arange(12, dtype=np.float32).reshape(2, 6),   # 2 layers x 3
             "teacher_act": np.arange(16, dtype=np.float32).reshape(2, 8)}   # 2 layers x 4
    sem, act = _teacher_targets(batch, _job("aaaa"), layers=2)
    assert sem.shape == (2, 2, 3) and act.shape == (2, 2, 4)
    assert sem[1, 0].tolist() == [3.0, 4.0, 5.0]        # layer 1 of row 0
    batch["teacher_hash"] = np.array(["aaaa", "zzzz"])
    with pytest.raises(ValueError, match="zzzz"):
        _teacher_targets(batch, _job("aaaa"), layers=2)
