"""S3 answers errors for 20 s while a distill streams its shards from it: the reads are retried (the proxy counts
the refused requests), the run finishes, and its ledger equals an undisturbed run's: no row lost or repeated.
A real S3 API (moto on 127.0.0.1) behind a small fault-injecting TCP proxy, also on 127.0.0.1."""

import json
import socket
import socketserver
import threading
import time
from pathlib import Path

import boto3
import pytest
import ray
from fault_support import SMOKE, TINY, teacher_and_probes, write_expert_shards

from jobs import distill as distill_job
from pipeline.config import load_config
from pipeline.ray_runtime import start_ray

pytestmark = pytest.mark.slow

UNAVAILABLE = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
               b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy(socketserver.ThreadingTCPServer):
    """Forwards TCP to the S3 server; while `failing`, every new request gets HTTP 503 ServiceUnavailable and the
    connections already open are cut (keep-alive connections would otherwise carry on past the fault)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.failing, self.refused = upstream, False, 0
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def fail(self, on: bool) -> None:
        with self.lock:
            self.failing = on
            cut, self.open = (self.open, set()) if on else (set(), self.open)
        for conn in cut:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        proxy: FaultyProxy = self.server
        if proxy.failing:
            self._refuse()
            return
        upstream = socket.create_connection(proxy.upstream)
        with proxy.lock:
            proxy.open |= {self.request, upstream}
        pump = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
        pump.start()
        _pipe(self.request, upstream)
        pump.join(timeout=5)

    def _refuse(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        with self.server.lock:
            self.server.refused += 1
        self.request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(UNAVAILABLE) + UNAVAILABLE)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture(scope="module")
def s3_behind_proxy():
    from moto.server import ThreadedMotoServer

    if ray.is_initialized():   # workers must start with this module's S3 endpoint in their environment
        ray.shutdown()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    proxy = FaultyProxy(server.get_host_and_port())
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="stall")
    write_expert_shards("s3://stall/shards", rows_per_shard=40)
    yield proxy
    if ray.is_initialized():
        ray.shutdown()
    proxy.shutdown()
    proxy.server_close()
    mp.undo()
    server.stop()


def _config(tmp_path, name):
    cfg = load_config(SMOKE, TINY + [
        f"run.run_dir={tmp_path / name}", "data.shards_uri=s3://stall/shards", "data.cache=never",
        f"tracking.tracking_uri=sqlite:///{tmp_path / name}.db", "distill.teacher_mode=online", "distill.eval_every=0",
        "distill.train.steps=60", "distill.train.batch_size=8", "distill.train.ledger=true",
        "distill.train.num_workers=1", "distill.train.checkpoint_every=0"])
    teacher_and_probes(cfg)
    return cfg


def _ledger(run_dir):
    paths = list((Path(run_dir) / "ray").glob("*/ledger/rank0.jsonl"))
    lines = paths[0].read_text().splitlines() if paths else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_a_20s_s3_outage_mid_stream_is_retried_and_no_row_is_lost_or_repeated(s3_behind_proxy, tmp_path,
                                                                               record_property):
    proxy = s3_behind_proxy
    reference = _config(tmp_path, "reference")
    start_ray(reference)
    started = time.monotonic()
    distill_job.main(reference)   # undisturbed: the ledger to compare with
    undisturbed_s = time.monotonic() - started

    cfg = _config(tmp_path, "stalled")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=distill_job.main(cfg)))
    started = time.monotonic()
    thread.start()
    deadline = time.time() + 300
    while len(_ledger(cfg.run.run_dir)) < 25 and thread.is_alive() and time.time() < deadline:   # past epoch 1
        time.sleep(0.02)
    proxy.fail(True)
    at_fault = len(_ledger(cfg.run.run_dir))
    time.sleep(20)
    proxy.fail(False)
    thread.join(timeout=600)
    stalled_s = time.monotonic() - started

    assert "result" in outcome, "the distill did not finish"
    assert at_fault < 60 and proxy.refused > 0    # the fault hit a running distill, and its reads were retried
    ours, theirs = _ledger(cfg.run.run_dir), _ledger(reference.run.run_dir)
    assert [(e["step"], e["rows"], e["digest"]) for e in ours] == [(e["step"], e["rows"], e["digest"]) for e in theirs]
    record_property("fault", "S3 answers 503 to every request for 20 s while distill streams its shards")
    record_property("outcome", f"{proxy.refused} refused request(s) retried; the run finished, its ledger equal "
                               f"to an undisturbed run's")
    record_property("steps_lost", 0)
    record_property("rows_lost", 0)
    record_property("recover_s", round(stalled_s - undisturbed_s, 1))   # wall time added to the run
