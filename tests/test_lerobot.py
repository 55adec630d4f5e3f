"""Importing a LeRobotDataset v3 folder (image columns, tasks table) into shards + manifest, and its errors."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.data.lerobot import LeRobotFormatError, import_lerobot
from pipeline.data.manifest import read_manifest
from pipeline.data.validate import ShardError, validate_shards

H, W = 12, 16
STATE_DIM, ACTION_DIM = 6, 3
# episode_index -> (file, task_index, frames)
EPISODES = {0: ("file-000", 1, 5), 1: ("file-000", 0, 4), 2: ("file-001", 1, 6)}
TASKS = {0: "open the drawer", 1: "pick up the red cube"}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def frame_pixels(ep: int, frame: int, size=(H, W)) -> np.ndarray:
    return np.random.default_rng(ep * 100 + frame).integers(0, 255, (*size, 3), dtype=np.uint8)


def write_folder(root, tasks: str | None = "parquet", image_size=(H, W), nan_at=None):
    """A LeRobot v3 folder: meta/info.json, meta/tasks.*, data/chunk-000/file-00N.parquet (rows shuffled)."""
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    image = {"dtype": "image", "shape": [H, W, 3], "names": ["height", "width", "channels"]}
    info = {"codebase_version": "v3.0", "fps": 10,
            "features": {"observation.state": {"dtype": "float32", "shape": [STATE_DIM]},
                         "action": {"dtype": "float32", "shape": [ACTION_DIM]},
                         "observation.images.top": image, "observation.images.wrist": image,
                         "episode_index": {"dtype": "int64", "shape": [1]},
                         "frame_index": {"dtype": "int64", "shape": [1]}}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    if tasks == "parquet":
        pd.DataFrame({"task_index": list(TASKS)}, index=pd.Index(list(TASKS.values()), name="task")).to_parquet(
            root / "meta" / "tasks.parquet")
    elif tasks == "jsonl":
        (root / "meta" / "tasks.jsonl").write_text(
            "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in TASKS.items()) + "\n")
    for file in ("file-000", "file-001"):
        rows = [(ep, task, f) for ep, (fl, task, n) in EPISODES.items() if fl == file for f in range(n)]
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # order must not matter
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        actions = [[ep + f / 10, -f / 10, 0.5] for ep, _, f in rows]
        if nan_at is not None and file == "file-000":
            actions[[i for i, r in enumerate(rows) if r[::2] == nan_at][0]][1] = float("nan")
        table = pa.table({
            "observation.state": pa.array([[float(ep)] * STATE_DIM for ep, _, f in rows], pa.list_(pa.float32())),
            "action": pa.array(actions, pa.list_(pa.float32())),
            "observation.images.top": pa.array(
                [{"bytes": png(frame_pixels(ep, f, image_size)), "path": f"{ep}_{f}.png"} for ep, _, f in rows],
                image_type),
            "observation.images.wrist": pa.array([{"bytes": png(frame_pixels(9, 9)), "path": None}] * len(rows),
                                                 image_type),
            "timestamp": pa.array([f / 10 for _, _, f in rows], pa.float32()),
            "frame_index": pa.array([f for _, _, f in rows], pa.int64()),
            "episode_index": pa.array([ep for ep, _, _ in rows], pa.int64()),
            "index": pa.array(range(len(rows)), pa.int64()),
            "task_index": pa.array([t for _, t, _ in rows], pa.int64()),
        })
        pq.write_table(table, root / "data" / "chunk-000" / f"{file}.parquet")
    return root


def test_import_maps_columns_tasks_and_images(tmp_path):
    src = write_folder(tmp_path / "my_robot_data")
    out = tmp_path / "shards"
    manifest = import_lerobot(str(src), str(out), instruction=None, rows_per_shard=4)
    assert manifest == read_manifest(str(out))
    assert (manifest.action_dim, manifest.proprio_dim, manifest.image_shape) == (ACTION_DIM, STATE_DIM, [H, W, 3])
    assert (manifest.num_episodes, manifest.num_steps, len(manifest.shards)) == (3, 15, 4)
    assert [e.episode_id for e in manifest.episodes] == [f"my_robot_data/e{i:06d}" for i in range(3)]
    assert [e.num_steps for e in manifest.episodes] == [5, 4, 6]
    assert manifest.tasks == ["pick up the red cube", "open the drawer"]
    assert manifest.instructions["open the drawer"] == "open the drawer"
    assert validate_shards(str(out), manifest).num_bad == 0

    table = pa.concat_tables([pq.read_table(out / name) for name in manifest.shards])
    # Rows are in (episode, step) order whatever order the LeRobot file had.
    assert table["episode_id"].to_pylist()[:6] == ["my_robot_data/e000000"] * 5 + ["my_robot_data/e000001"]
    assert table["step"].to_pylist()[:6] == [0, 1, 2, 3, 4, 0]
    assert table["instruction"].to_pylist()[5] == "open the drawer"
    row = 5 + 4 + 3  # episode 2, frame 3
    np.testing.assert_array_equal(np.asarray(table["image"][row].as_py(), np.uint8).reshape(H, W, 3),
                                  frame_pixels(2, 3))  # PNG is lossless: exact pixels
    np.testing.assert_allclose(table["action"][row].as_py(), [2.3, -0.3, 0.5], rtol=1e-6)
    assert table["proprio"][row].as_py() == [2.0] * STATE_DIM
    assert [i for i, d in enumerate(table["done"].to_pylist()) if d] == [4, 8, 14]
    np.testing.assert_allclose(manifest.action_stats.mean[2], 0.5, rtol=1e-6)


def test_tasks_jsonl_and_instruction_fallback(tmp_path):
    manifest = import_lerobot(str(write_folder(tmp_path / "a", tasks="jsonl")), str(tmp_path / "out_a"),
                              rows_per_shard=100)
    assert set(manifest.tasks) == set(TASKS.values())
    src = write_folder(tmp_path / "b", tasks=None)
    manifest = import_lerobot(str(src), str(tmp_path / "out_b"), instruction="stack the blocks", rows_per_shard=100)
    assert manifest.tasks == ["stack the blocks"] and len(manifest.shards) == 1
    with pytest.raises(LeRobotFormatError, match="--instruction"):
        import_lerobot(str(src), str(tmp_path / "out_c"), instruction=None)


def test_camera_choice(tmp_path):
    src = write_folder(tmp_path / "d")
    manifest = import_lerobot(str(src), str(tmp_path / "out"), camera="observation.images.wrist")
    first = pq.read_table(tmp_path / "out" / manifest.shards[0])["image"][0].as_py()
    np.testing.assert_array_equal(np.asarray(first, np.uint8).reshape(H, W, 3), frame_pixels(9, 9))
    with pytest.raises(LeRobotFormatError, match=r"camera 'observation\.images\.side'.*observation\.images\.top"):
        import_lerobot(str(src), str(tmp_path / "out2"), camera="observation.images.side")


def test_wrong_image_size_names_file_and_row(tmp_path):
    src = write_folder(tmp_path / "e", image_size=(10, 10))
    with pytest.raises(LeRobotFormatError, match=r"file-000\.parquet row \d+: observation\.images\.top decodes to "
                                                 r"10x10x3 but meta/info\.json says 12x16x3"):
        import_lerobot(str(src), str(tmp_path / "out"))


def test_missing_feature_and_folder(tmp_path):
    src = write_folder(tmp_path / "f")
    info = json.loads((src / "meta" / "info.json").read_text())
    del info["features"]["observation.state"]
    (src / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(LeRobotFormatError, match=r"info\.json: features lacks 'observation\.state'"):
        import_lerobot(str(src), str(tmp_path / "out"))
    with pytest.raises(LeRobotFormatError, match=r"meta/info\.json does not exist"):
        import_lerobot(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_nan_action_is_kept_for_validation_to_judge(tmp_path):
    src = write_folder(tmp_path / "g", nan_at=(1, 2))  # episode 1, frame 2
    out = tmp_path / "out"
    manifest = import_lerobot(str(src), str(out), rows_per_shard=100)
    assert np.isfinite(manifest.action_stats.mean).all()  # statistics leave the bad row out
    with pytest.raises(ShardError, match=r"row 7 \(episode g/e000001, step 2\): action holds NaN"):
        validate_shards(str(out), manifest)
    assert validate_shards(str(out), manifest, "skip").skip_rows == {("g/e000001", 2)}


def test_cli_tool(tmp_path, capsys):
    src = write_folder(tmp_path / "h")
    out = tmp_path / "out"
    assert cli_main(["import-lerobot", "--src", str(src), "--out", str(out), "--rows-per-shard", "7"]) == 0
    assert "wrote 3 episodes, 15 steps, 3 shards" in capsys.readouterr().out
    assert read_manifest(str(out)).num_steps == 15
    assert cli_main(["import-lerobot", "--src", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "meta/info.json does not exist" in capsys.readouterr().err
