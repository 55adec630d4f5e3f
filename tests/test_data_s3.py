"""The data plane on a real S3 API (moto on 127.0.0.1): collect writes shards there, Ray Data streams them back."""

import numpy as np
import pytest
import ray

from pipeline.config import load_config
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.manifest import read_manifest, verify_hash
from pipeline.data.shards import open_shards, split_episodes, write_shards
from pipeline.data.validate import validate_shards
from pipeline.sim.collect import collect_episodes
from pipeline.stages import RunPaths

pytestmark = pytest.mark.slow   # Ray, Meta-World and an S3 server

SIZE = 32


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    # After s3_server: Ray's workers inherit the endpoint and credentials from the environment.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield s3_server
    ray.shutdown()


@pytest.fixture(scope="module")
def collected(ray_s3, tmp_path_factory):
    import jobs.collect

    run_dir = tmp_path_factory.mktemp("run")
    uri = f"{ray_s3}/collect/shards"
    # reach-v3 succeeds in ~40 steps and push-v3 in ~80 (seeds 0-1); 8 steps succeed at neither.
    cfg = load_config(None, [f"run.run_dir={run_dir}", f"data.shards_uri={uri}", "collect.tasks=[reach-v3]",
                             "collect.episodes_per_task=2", f"collect.image_size={SIZE}", "collect.max_steps=150",
                             "collect.rows_per_shard=30"])
    return cfg, jobs.collect.main(cfg)


def test_collect_job_writes_shards_and_manifest_to_s3(collected):
    cfg, written = collected
    manifest = read_manifest(RunPaths.of(cfg).shards)
    assert manifest == written and RunPaths.of(cfg).shards.startswith("s3://")
    assert manifest.num_episodes == 2 and all(e.success for e in manifest.episodes)
    assert manifest.num_steps == sum(e.num_steps for e in manifest.episodes)
    assert len(manifest.shards) == -(-manifest.num_steps // 30)  # rows per shard honoured
    assert manifest.image_shape == [SIZE, SIZE, 3] and (manifest.action_dim, manifest.proprio_dim) == (4, 4)
    assert manifest.tasks == ["reach-v3"] and manifest.instructions == {"reach-v3": "reach to the goal position"}
    for stats in (manifest.action_stats, manifest.proprio_stats):
        assert len(stats.mean) == len(stats.std) == len(stats.q01) == len(stats.q99) == 4
    verify_hash(RunPaths.of(cfg).shards, manifest)
    assert validate_shards(RunPaths.of(cfg).shards, manifest).num_bad == 0


def test_collect_is_deterministic_across_runs_and_stores(collected, tmp_path):
    cfg, on_s3 = collected
    episodes, dropped = collect_episodes(cfg.collect)
    local = write_shards(episodes, str(tmp_path), cfg.collect.rows_per_shard, dropped)
    assert local.content_hash == on_s3.content_hash  # same seeds, same bytes, wherever they are stored


def test_short_episodes_are_dropped_and_counted(ray_s3):
    cfg = load_config(None, ["collect.tasks=[push-v3]", "collect.episodes_per_task=2", "collect.image_size=16",
                             "collect.max_steps=8"]).collect
    kept, dropped = collect_episodes(cfg)
    assert (len(kept), dropped) == (0, 2)


def test_ray_data_streams_split_and_normalises_from_s3(collected):
    cfg, manifest = collected
    train, val = split_episodes(manifest, 0.5)
    assert len(train) == len(val) == 1 and (train, val) == split_episodes(read_manifest(RunPaths.of(cfg).shards), 0.5)
    steps = {e.episode_id: e.num_steps for e in manifest.episodes}
    norm = Normalizer.from_manifest(manifest)
    mean, std = (np.asarray(v, np.float32) for v in (manifest.action_stats.mean, manifest.action_stats.std))
    rows = 0
    for batch in open_shards(RunPaths.of(cfg).shards, manifest, episodes=train).iter_batches(batch_size=16,
                                                                                  batch_format="numpy"):
        model = to_model_batch(batch, norm, tuple(manifest.image_shape))
        assert set(model["episode_id"]) == train
        assert model["images"].shape[1:] == (3, SIZE, SIZE) and float(model["images"].max()) <= 1.0
        raw = np.stack(batch["action"])  # normalised with the manifest's per-dimension statistics
        np.testing.assert_allclose(model["actions"].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
        rows += len(model["episode_id"])
    assert rows == steps[next(iter(train))]
