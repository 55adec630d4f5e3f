"""Expert episodes, Parquet shards, the manifest, the train/val split and model batches, on real Meta-World data."""

import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.data.dataset import MaterializedDataset

from pipeline.config import CollectSection
from pipeline.data import ingest
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.manifest import read_manifest, verify_hash
from pipeline.data.shards import open_shards, split_episodes, write_shards
from pipeline.sim.collect import collect_episodes
from pipeline.sim.metaworld_env import PROPRIO_DIM, SimEnv, run_expert_episode
from pipeline.sim.tasks import INSTRUCTIONS, TASKS, instruction_for

SIZE, STEPS = 32, 30
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def episodes():
    # Too short to succeed; the data path does not care, and 4 episodes take ~2 s.
    return [run_expert_episode(task, seed, SIZE, "corner", STEPS) for task in ("reach-v3", "push-v3")
            for seed in (0, 1)]


@pytest.fixture(scope="module")
def shard_dir(episodes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    manifest = write_shards(episodes, str(folder), rows_per_shard=50, dropped=0)
    return folder, manifest


@pytest.fixture(scope="module")
def ray_local():
    # Workers must import `pipeline` even before the project is pip-installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_expert_episode_is_deterministic_per_seed(episodes):
    again = run_expert_episode("reach-v3", 0, SIZE, "corner", STEPS)
    first = episodes[0]
    assert first.episode_id == "reach-v3/s000000"
    np.testing.assert_array_equal(first.actions, again.actions)
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.actions, episodes[1].actions)  # another seed, another goal


@pytest.mark.slow
def test_action_noise_is_executed_but_labels_stay_the_experts(monkeypatch):
    """collect.action_noise (DART-style): the env takes the expert's action plus noise on dx, dy, dz; each stored
    label is the clean expert action for the state the noisy motion reached, and the episode is reproducible."""
    from metaworld.policies import ENV_POLICY_MAP

    from pipeline.sim.metaworld_env import expert_action

    seen: list[tuple[np.ndarray, np.ndarray]] = []   # (state the action was chosen in, action executed)
    step = SimEnv.step

    def spy(env, action):
        seen.append((env.expert_state().copy(), np.asarray(action, dtype=np.float32).copy()))
        return step(env, action)

    monkeypatch.setattr(SimEnv, "step", spy)
    noisy = run_expert_episode("reach-v3", 0, SIZE, "corner", STEPS, action_noise=0.3)
    monkeypatch.setattr(SimEnv, "step", step)
    clean = run_expert_episode("reach-v3", 0, SIZE, "corner", STEPS)

    policy = ENV_POLICY_MAP["reach-v3"]()
    probe = SimEnv("reach-v3", 0, SIZE)
    try:
        for t, (state, executed) in enumerate(seen):
            probe._raw = state   # the expert reads only the privileged state
            np.testing.assert_allclose(noisy.actions[t], np.clip(expert_action(policy, probe), -1, 1), atol=1e-6)
            assert executed[3] == noisy.actions[t][3]   # the gripper is not perturbed
    finally:
        probe.close()
    motion = np.stack([e for _, e in seen])[:, :3] - noisy.actions[:, :3]
    assert 0.2 < motion.std() < 0.4   # the executed motion carries noise of about the asked std
    np.testing.assert_array_equal(noisy.actions[0], clean.actions[0])   # the same start, the same first label
    assert not np.allclose(noisy.proprio[5:], clean.proprio[5:])        # the noise moved the hand elsewhere
    again = run_expert_episode("reach-v3", 0, SIZE, "corner", STEPS, action_noise=0.3)
    np.testing.assert_array_equal(noisy.actions, again.actions)


@pytest.mark.slow
def test_episode_shapes_and_dtypes(episodes):
    ep = episodes[0]
    assert ep.images.shape == (STEPS, SIZE, SIZE, 3) and ep.images.dtype == np.uint8
    assert ep.proprio.shape == (STEPS, 4) and ep.proprio.dtype == np.float32
    assert ep.actions.shape == (STEPS, 4) and ep.actions.dtype == np.float32
    assert np.abs(ep.actions).max() <= 1.0
    assert ep.images.std() > 0  # a real render, not a blank frame


def test_an_instruction_for_each_of_the_50_metaworld_tasks():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    assert len(TASKS) == 50 and set(TASKS) == set(ALL_V3_ENVIRONMENTS)
    texts = [instruction_for(t) for t in TASKS]
    assert len(set(texts)) == 50  # no two tasks share an instruction
    # Plain English: lower-case words and spaces, a few words long, no task-name jargon like "-v3".
    assert all(re.fullmatch(r"[a-z]+( [a-z]+){1,12}", t) for t in texts), [t for t in texts if "-" in t]
    assert INSTRUCTIONS["drawer-open-v3"] == "open the drawer"


@pytest.mark.slow
def test_observation_is_image_and_proprio_only():
    env = SimEnv("pick-place-v3", 3, SIZE)
    try:
        obs = env.reset()
        # Only the frame and the body's own state: nothing a policy could read object positions from.
        assert [f.name for f in dataclasses.fields(obs)] == ["image", "proprio"] and not hasattr(obs, "_raw")
        assert obs.image.shape == (SIZE, SIZE, 3) and obs.image.dtype == np.uint8
        assert obs.proprio.shape == (PROPRIO_DIM,) == (4,) and obs.proprio.dtype == np.float32
        np.testing.assert_allclose(obs.proprio[:3], env._env.get_endeff_pos(), atol=1e-6)  # hand xyz
        assert 0.0 <= obs.proprio[3] <= 1.0  # gripper opening
        state = env.expert_state()  # the privileged 39-D state stays with the env, for the expert
        assert state.shape == (39,) and not np.isin(state[4:7], obs.proprio).any()  # object xyz
    finally:
        env.close()


def test_unknown_task_lists_choices():
    with pytest.raises(KeyError, match="reach-v3"):
        SimEnv("reach-v9", 0, SIZE)


@pytest.mark.slow
def test_manifest_round_trip_and_stats(shard_dir, episodes):
    folder, written = shard_dir
    manifest = read_manifest(str(folder))
    assert manifest == written
    assert manifest.num_steps == sum(ep.num_steps for ep in episodes) == 4 * STEPS
    assert manifest.shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert manifest.image_shape == [SIZE, SIZE, 3]
    for stats, dim in ((manifest.action_stats, manifest.action_dim), (manifest.proprio_stats, manifest.proprio_dim)):
        assert len(stats.mean) == len(stats.std) == len(stats.q01) == len(stats.q99) == dim == 4
        assert min(stats.std) >= 1e-6
    np.testing.assert_allclose(manifest.action_stats.mean,
                               np.concatenate([ep.actions for ep in episodes]).mean(0), rtol=1e-5, atol=1e-6)
    verify_hash(str(folder), manifest)


@pytest.mark.slow
def test_tampered_shard_fails_hash(shard_dir, tmp_path):
    folder, manifest = shard_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(copy / "shard-00001.parquet")
    pq.write_table(table.slice(1), copy / "shard-00001.parquet")
    with pytest.raises(ValueError, match="content_hash"):
        verify_hash(str(copy), manifest)


def test_missing_manifest_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(str(tmp_path))


def test_empty_episode_list_explains_fix(tmp_path):
    with pytest.raises(ValueError, match="keep_failed"):
        write_shards([], str(tmp_path), rows_per_shard=10, dropped=3)


@pytest.mark.slow
def test_split_is_stable_and_disjoint(shard_dir):
    _, manifest = shard_dir
    train, val = split_episodes(manifest, 0.25)
    assert (train, val) == split_episodes(manifest, 0.25)
    assert not train & val and len(val) == 1
    assert train | val == {e.episode_id for e in manifest.episodes}
    assert split_episodes(manifest, 0.0)[1] == set()
    assert len(split_episodes(manifest, 0.01)[1]) == 1  # never an empty validation set by rounding


@pytest.mark.slow
def test_open_shards_to_model_batch(shard_dir, ray_local):
    folder, manifest = shard_dir
    train, val = split_episodes(manifest, 0.25)
    ds = open_shards(str(folder), episodes=train)
    rows = list(ds.iter_batches(batch_size=1000, batch_format="numpy"))
    assert {e for b in rows for e in b["episode_id"]} == train
    assert sum(len(b["step"]) for b in rows) == 3 * STEPS
    norm = Normalizer.from_manifest(manifest)
    batch = to_model_batch(next(iter(ds.iter_batches(batch_size=8, batch_format="numpy"))), norm,
                           tuple(manifest.image_shape))
    assert batch["images"].shape == (8, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert batch["proprio"].shape == (8, 4) and batch["actions"].shape == (8, 4)
    assert batch["step"].dtype == torch.int64 and len(batch["instructions"]) == 8
    assert isinstance(batch["episode_id"][0], str)
    restored = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_allclose(restored.denorm_action(batch["actions"]).numpy(),
                               norm.denorm_action(batch["actions"]).numpy())


@pytest.mark.slow
def test_small_folders_are_read_once_and_cached(shard_dir, ray_local, tmp_path, monkeypatch):
    folder, manifest = shard_dir
    shutil.copytree(folder, tmp_path / "copy")
    cached = open_shards(str(tmp_path / "copy"), manifest)
    streamed = open_shards(str(tmp_path / "copy"), manifest, cache=False)
    monkeypatch.setattr(ingest, "CACHE_FRACTION", 0.0)  # as if the object store were too small for the folder
    too_big = open_shards(str(tmp_path / "copy"), manifest)
    assert isinstance(cached, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset) and not isinstance(too_big, MaterializedDataset)

    def keys(ds):
        return sorted((r["episode_id"], int(r["step"])) for r in ds.take_all())

    assert keys(cached) == keys(streamed) == keys(too_big) and len(keys(cached)) == 4 * STEPS
    # Later passes over cached rows never touch storage again: they outlive the folder.
    shutil.rmtree(tmp_path / "copy")
    for _ in range(2):
        assert sum(len(b["step"]) for b in cached.iter_batches(batch_size=32, batch_format="numpy")) == 4 * STEPS


@pytest.mark.slow
def test_missing_column_is_named(shard_dir, tmp_path):
    folder, manifest = shard_dir
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(tmp_path / "shard-00000.parquet")
    pq.write_table(table.drop_columns(["action"]), tmp_path / "shard-00000.parquet")
    with pytest.raises(ValueError, match=r"shard-00000\.parquet lacks column\(s\) \['action'\]"):
        open_shards(str(tmp_path), manifest)


@pytest.mark.slow
def test_collect_orders_and_drops(ray_local):
    cfg = CollectSection(tasks=["push-v3", "reach-v3"], episodes_per_task=2, image_size=16, max_steps=5, seed=7)
    kept, dropped = collect_episodes(cfg)
    assert (kept, dropped) == ([], 4)  # 5 steps never succeed, so every episode is a failure
    kept, dropped = collect_episodes(cfg.model_copy(update={"keep_failed": True}))
    assert [e.episode_id for e in kept] == ["push-v3/s000007", "push-v3/s000008",
                                           "reach-v3/s000007", "reach-v3/s000008"]
    assert dropped == 0
