"""Bad input never reaches training silently: truncated shards, missing columns, wrong sizes, NaN, bad hashes, dead S3."""

import http.client
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import ConfigError, load_config
from pipeline.data import storage
from pipeline.data.manifest import hash_shards, read_manifest, write_manifest
from pipeline.data.shards import open_shards, write_shards
from pipeline.data.validate import ShardError, validate_shards
from pipeline.sim.metaworld_env import Episode

SIZE, STEPS = 8, 10


def fake_episode(task: str, seed: int) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(episode_id=f"{task}/s{seed:06d}", task=task, seed=seed, instruction=f"do {task}",
                   images=rng.integers(0, 255, (STEPS, SIZE, SIZE, 3), dtype=np.uint8),
                   proprio=rng.normal(size=(STEPS, 4)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (STEPS, 4)).astype(np.float32), success=True)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    episodes = [fake_episode("reach-v3", s) for s in range(3)]
    return folder, write_shards(episodes, str(folder), rows_per_shard=12)


@pytest.fixture
def copy(good, tmp_path):
    folder, manifest = good
    shutil.copytree(folder, tmp_path / "copy")
    return tmp_path / "copy", manifest


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def rewrite(path, column, fn):
    """Replace one vector column of a shard with fn(values as a (rows, n) array)."""
    table = pq.read_table(path)
    col = table[column].combine_chunks()
    values = fn(col.flatten().to_numpy().reshape(len(col), -1).copy())
    new = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), col.type.value_type), values.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, new), path)


def rehash(folder, manifest):
    """The manifest an external writer would produce for the modified shards (so only the rows are bad)."""
    found = hash_shards({n: (folder / n).read_bytes() for n in manifest.shards})
    fixed = manifest.model_copy(update={"content_hash": found})
    write_manifest(str(folder), fixed)
    return fixed


def test_good_folder_validates(good):
    folder, manifest = good
    report = validate_shards(str(folder), manifest)
    assert (report.num_shards, report.num_rows, report.num_bad) == (3, 3 * STEPS, 0)
    assert report.skip_rows is None


def test_truncated_shard_is_named(copy):
    folder, manifest = copy
    path = folder / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-00001\.parquet is not a readable Parquet file.*truncated"):
        validate_shards(str(folder), manifest)
    # The reader refuses it too, before any Ray task starts.
    with pytest.raises(ValueError, match=r"shard-00001\.parquet is not a readable Parquet file"):
        open_shards(str(folder), manifest)


def test_missing_shard_is_named(copy):
    folder, manifest = copy
    (folder / "shard-00002.parquet").unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.parquet is listed in .*manifest\.json but missing"):
        validate_shards(str(folder), manifest)


def test_missing_column_is_named(copy):
    folder, manifest = copy
    path = folder / "shard-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["proprio"]), path)
    with pytest.raises(ShardError, match=r"shard-00000\.parquet lacks column\(s\) \['proprio'\]"):
        validate_shards(str(folder), manifest, on_bad_rows="skip")  # not a row problem: skip cannot help


def test_wrong_image_size_names_file_and_manifest(good):
    folder, manifest = good
    other = manifest.model_copy(update={"image_shape": [16, 16, 3]})
    with pytest.raises(ShardError, match=r"shard-00000\.parquet: column 'image' has 192 values per row but "
                                         r".*image_shape=\[16, 16, 3\] \(= 768 values\)"):
        validate_shards(str(folder), other)


def test_wrong_length_row_in_variable_list_is_a_bad_row(copy):
    folder, manifest = copy
    path = folder / "shard-00001.parquet"
    table = pq.read_table(path)
    rows = table["image"].to_pylist()
    rows[4] = rows[4][:100]  # a foreign writer's variable-length list with one short image
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(rows, pa.list_(pa.uint8())))
    pq.write_table(table, path)
    manifest = rehash(folder, manifest)
    with pytest.raises(ShardError, match=r"shard-00001\.parquet row 4 \(episode reach-v3/s000001, step 6\): "
                                         r"image has 100 values, expected image_shape"):
        validate_shards(str(folder), manifest)


def test_nan_or_inf_is_named_by_file_and_row(copy):
    folder, manifest = copy

    def poison(a):
        a[3, 1] = np.nan
        return a

    rewrite(folder / "shard-00000.parquet", "action", poison)
    manifest = rehash(folder, manifest)
    with pytest.raises(ShardError, match=r"1 bad row\(s\) of 30: .*shard-00000\.parquet row 3 \(episode "
                                         r"reach-v3/s000000, step 3\): action holds NaN.*data\.on_bad_rows=skip"):
        validate_shards(str(folder), manifest)


@pytest.mark.slow
def test_skip_policy_counts_logs_and_excludes_rows(copy, ray_local, caplog):
    folder, manifest = copy

    def inf_at(row):
        def poison(a):
            a[row, 0] = np.inf
            return a
        return poison

    rewrite(folder / "shard-00000.parquet", "action", inf_at(5))
    rewrite(folder / "shard-00002.parquet", "proprio", inf_at(0))  # shard 2 starts at episode 2, step 4
    manifest = rehash(folder, manifest)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.validate"):
        report = validate_shards(str(folder), manifest, on_bad_rows="skip")
    assert report.num_bad == 2 and "skipping 2 bad row(s) of 30" in caplog.text
    assert report.skip_rows == {("reach-v3/s000000", 5), ("reach-v3/s000002", 4)}
    rows = open_shards(str(folder), manifest, skip_rows=report.skip_rows).take_all()
    keys = {(r["episode_id"], r["step"]) for r in rows}
    assert len(rows) == 28 and not keys & report.skip_rows
    assert all(np.isfinite(r["action"]).all() and np.isfinite(r["proprio"]).all() for r in rows)
    # The episode filter and the bad-row filter compose.
    val = open_shards(str(folder), manifest, episodes={"reach-v3/s000002"}, skip_rows=report.skip_rows)
    assert val.count() == STEPS - 1


def test_hash_mismatch_names_manifest(copy):
    folder, manifest = copy
    path = folder / "shard-00001.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)  # valid Parquet, valid rows, different bytes
    with pytest.raises(ShardError, match=r"manifest\.json: content_hash is .* the shards were modified"):
        validate_shards(str(folder), manifest, on_bad_rows="skip")


def test_unknown_policy_and_config_key():
    with pytest.raises(ValueError, match=r"choose from \['error', 'skip'\]"):
        validate_shards("unused", None, on_bad_rows="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"data\.on_bad_rows='drop'.*error.*skip"):
        load_config(None, ["data.on_bad_rows=drop"])
    assert load_config(None, ["data.on_bad_rows=skip"]).data.on_bad_rows == "skip"


class FailingS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of the moto S3 server that answers the first `fail_first` requests
    with 503 (an endpoint restarting or throttling) and forwards the rest; `requests` counts every attempt."""

    def __init__(self, upstream: str, fail_first: int):
        self.requests, self.fail_first = 0, fail_first
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                proxy.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.requests <= proxy.fail_first:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request(self.command, self.path, body, dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():   # HEAD keeps the object's Content-Length
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_server, good, monkeypatch):
    """The good shards on moto, reached through a FailingS3Proxy (set `fail_first` on it before reading)."""
    folder, _ = good
    uri = f"{s3_server}/flaky"
    for path in sorted(folder.iterdir()):
        storage.write_bytes(f"{uri}/{path.name}", path.read_bytes())
    proxy = FailingS3Proxy(os.environ["AWS_ENDPOINT_URL"], fail_first=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(storage, "S3_OPTIONS", storage.S3Options(max_attempts=3, connect_timeout=0.5,
                                                                 request_timeout=2.0))
    yield proxy, uri
    proxy.close()


@pytest.mark.slow
def test_s3_failures_are_retried_until_the_read_succeeds(flaky_s3, good):
    proxy, uri = flaky_s3
    proxy.fail_first = 2   # two 503s, then the third of max_attempts=3 gets through
    assert read_manifest(uri) == good[1]
    # read_manifest checks the file exists (HEAD), then opens it (HEAD) and reads it (GET): the first HEAD
    # fails twice and gets through on its 3rd attempt, then 2 more requests.
    assert proxy.requests == 2 + 1 + 2


@pytest.mark.slow
def test_s3_failing_past_max_attempts_names_the_bucket_and_endpoint(flaky_s3):
    proxy, uri = flaky_s3
    proxy.fail_first = 1000
    started = time.perf_counter()
    with pytest.raises(storage.StorageUnreachable,
                       match=rf"{re.escape(proxy.endpoint)} for s3://actdistill/flaky/manifest\.json "
                             r"after 3 attempts"):
        read_manifest(uri)
    assert proxy.requests == 3   # exactly max_attempts, then the error
    assert time.perf_counter() - started < 20


def test_unreachable_s3_is_retried_then_named(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "S3_OPTIONS", storage.S3Options(max_attempts=3, connect_timeout=0.5,
                                                                 request_timeout=1.0))
    started = time.perf_counter()
    with pytest.raises(storage.StorageUnreachable,
                       match=rf"cannot reach http://127\.0\.0\.1:{port} for s3://actdistill/shards/manifest\.json "
                             r"after 3 attempts"):
        read_manifest("s3://actdistill/shards")
    assert time.perf_counter() - started < 20


@pytest.mark.slow
def test_cli_names_a_corrupt_shard_in_one_line_without_a_traceback(copy, tmp_path):
    folder, _ = copy
    path = folder / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train-teacher", "--config", "jobs/configs/smoke.yaml",
                           f"run.run_dir={tmp_path / 'run'}", f"data.shards_uri={folder}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert re.match(rf"error: {re.escape(str(path))} is not a readable Parquet file.*truncated", line)


def stage_config(folder, tmp_path, policy="error"):
    return load_config(None, [f"run.run_dir={tmp_path / 'run'}", f"data.shards_uri={folder}",
                              f"data.on_bad_rows={policy}"])


def poison_action(folder, manifest):
    """Row 3 of shard 0 gets a NaN action; the manifest is re-hashed so only the row is bad."""
    def poison(a):
        a[3, 1] = np.nan
        return a

    rewrite(folder / "shard-00000.parquet", "action", poison)
    return rehash(folder, manifest)


@pytest.mark.slow
def test_probe_teacher_refuses_a_bad_shard_before_loading_the_teacher(copy, ray_local, tmp_path):
    from jobs import probe_teacher

    folder, manifest = copy
    poison_action(folder, manifest)
    with pytest.raises(ShardError, match=r"shard-00000\.parquet row 3 \(episode reach-v3/s000000, step 3\): "
                                         r"action holds NaN.*data\.on_bad_rows=skip"):
        probe_teacher.main(stage_config(folder, tmp_path))
    path = folder / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-00001\.parquet is not a readable Parquet file.*truncated"):
        probe_teacher.main(stage_config(folder, tmp_path, "skip"))  # a broken file: skip cannot help


@pytest.mark.slow
def test_evaluate_refuses_a_bad_shard_before_any_rollout(copy, ray_local, tmp_path):
    from jobs import evaluate

    folder, manifest = copy
    poison_action(folder, manifest)
    # No teacher or student exists: the job must stop at the data, before it needs a policy.
    with pytest.raises(ShardError, match=r"shard-00000\.parquet row 3 .*action holds NaN"):
        evaluate.main(stage_config(folder, tmp_path))


def test_a_stored_report_is_reused_only_while_the_shards_are_unchanged(copy, tmp_path, caplog):
    folder, manifest = copy
    manifest = poison_action(folder, manifest)
    reports = tmp_path / "validation"
    with caplog.at_level(logging.INFO, logger="pipeline.data.validate"):
        first = validate_shards(str(folder), manifest, "skip", cache_dir=reports)
        assert "not read again" not in caplog.text and len(list(reports.iterdir())) == 1
        again = validate_shards(str(folder), manifest, "skip", cache_dir=reports)
    assert again == first and "not read again" in caplog.text and "skipping 1 bad row(s) of 30" in caplog.text
    # The stored report holds the bad row, so a stage with on_bad_rows=error still refuses the folder.
    with pytest.raises(ShardError, match=r"shard-00000\.parquet row 3 .*action holds NaN"):
        validate_shards(str(folder), manifest, "error", cache_dir=reports)
    # Same size, same manifest, different bytes: the shard is read again and the mismatch found.
    path = folder / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"content_hash is .* the shards were modified"):
        validate_shards(str(folder), manifest, "skip", cache_dir=reports)


def epoch_orders(folder, manifest, epochs=2):
    """What each of 2 Train workers reads per epoch: the shards through shuffle_each_epoch, split the way
    Ray Train splits them under replayable_data_config (preserve_order, equal splits)."""
    from pipeline.data.shards import shuffle_each_epoch

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    splits = shuffle_each_epoch(open_shards(str(folder), manifest), seed=0).streaming_split(2, equal=True)
    orders = {0: [], 1: []}

    def read(rank):
        for _ in range(epochs):
            orders[rank].append([f"{r['episode_id']}/{r['step']}" for r in splits[rank].iter_rows()])

    workers = [threading.Thread(target=read, args=(rank,)) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return orders


@pytest.mark.slow
def test_each_epoch_is_shuffled_anew_and_a_restart_replays_the_same_orders(good, ray_local):
    folder, manifest = good
    first = epoch_orders(folder, manifest)
    # With random_shuffle(seed=run.seed) every epoch repeated epoch 0's order.
    assert first[0][0] != first[0][1] and sorted(first[0][0] + first[1][0]) == sorted(first[0][1] + first[1][1])
    assert epoch_orders(folder, manifest) == first   # a restarted run (new dataset, epoch 0 again) replays them
