"""The run folder fills up while a checkpoint is written: the stage fails naming the folder, the last registered
checkpoint stays usable, and --resume continues once space is freed, with no optimizer step lost or repeated.
The run folder is a small tmpfs mounted for the test (it needs the right to mount, as root in a container has)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fault_support import SMOKE, TINY, in_thread, teacher_and_probes

from jobs import distill as distill_job
from pipeline.cli import run_cli
from pipeline.config import load_config
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths

pytestmark = pytest.mark.slow

LEFT_FREE = 256 * 1024   # room for the ledger's lines and Ray's run snapshot, not for a checkpoint


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a 96 MB tmpfs for the run folder ({done.stderr.strip()}); this test needs the "
                    f"right to mount (root with CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _committed_step(run_dir):
    for snapshot in (Path(run_dir) / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except json.JSONDecodeError:   # caught mid-write
            return 0
        return int(latest.get("metrics", {}).get("step", 0))
    return 0


def _fill(folder: Path, leave: int) -> Path:
    """A ballast file taking all of the filesystem's free space but `leave` bytes."""
    stat = os.statvfs(folder)
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast


def _ledger(run_dir):
    (path,) = list((Path(run_dir) / "ray").glob("*/ledger/rank0.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_full_run_folder_fails_the_checkpoint_keeps_the_last_one_and_resume_finishes(shards, small_disk, tmp_path,
                                                                                      record_property):
    steps, every = 40, 10
    run_dir = small_disk / "run"
    overrides = TINY + [f"run.run_dir={run_dir}", f"data.shards_uri={shards}",
                        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "distill.teacher_mode=online",
                        "distill.eval_every=0", f"distill.train.steps={steps}", "distill.train.batch_size=8",
                        f"distill.train.checkpoint_every={every}", "distill.train.keep_checkpoints=2",
                        "distill.train.ledger=true", "distill.train.num_workers=1", "distill.train.max_failures=0"]
    config = tmp_path / "distill.yaml"
    config.write_text(SMOKE.read_text())
    cfg = load_config(config, overrides)
    teacher_and_probes(cfg)

    start_ray(cfg)   # in the main thread: Ray's head processes die with the thread that started them
    thread, outcome = in_thread(lambda: distill_job.main(cfg))
    deadline = time.time() + 600
    while _committed_step(run_dir) < every and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    ballast = _fill(small_disk, LEFT_FREE)
    thread.join(timeout=600)

    error = str(outcome.get("error"))
    name = next(p.name for p in (run_dir / "ray").iterdir() if (p / "actdistill_run.json").is_file())
    assert "out of space" in error and str(run_dir / "ray") in error, error
    assert f"--resume {name}" in error
    committed = _committed_step(run_dir)
    assert committed >= every and committed < steps
    # The registered checkpoint is whole; the one cut short is gone.
    checkpoints = [p for p in (run_dir / "ray" / name).glob("checkpoint_*") if p.is_dir()]
    assert all((p / "progress.json").is_file() and (p / "model.safetensors").is_file() for p in checkpoints)

    ballast.unlink()
    started = time.monotonic()
    assert run_cli(distill_job.main, "distill", ["--config", str(config), "--resume", name, *overrides]) == 0
    resumed_s = time.monotonic() - started
    entries = _ledger(run_dir)
    resumed_at = next(e["step"] for e in entries[1:] if e["pid"] != entries[0]["pid"]) - 1
    assert resumed_at == committed
    kept = [e["step"] for e in entries if e["pid"] == entries[0]["pid"] and e["step"] <= resumed_at]
    kept += [e["step"] for e in entries if e["pid"] != entries[0]["pid"]]
    assert kept == list(range(1, steps + 1))   # each optimizer step once
    assert (RunPaths.of(cfg).student / "model.safetensors").is_file()
    record_property("fault", "run folder full (96 MB tmpfs) while writing a checkpoint")
    record_property("outcome", f"stage failed naming the folder; --resume from step {committed} finished")
    record_property("steps_lost", 0)
    record_property("rows_lost", 0)
    record_property("recover_s", round(resumed_s, 1))   # the --resume run, once space was freed
