"""Training metrics to MLflow without waiting on it: a background sender that holds what a tracking outage delays.

Rank 0 of a training run logs a few metrics every `train.log_every` steps. Sent inline, one unreachable tracking
server would stall the step loop for minutes (MLflow retries each request with backoff, about 4 minutes by
default) and then kill the run. Here the step loop only appends to a queue; a thread sends the queue with
`log_batch` and, when the server does not answer, keeps everything and tries again every `retry_s`, so metrics
logged during an outage reach the server once it is back, in step order. If the oldest unsent value has waited
longer than `tracking.outage_limit_s`, the next `log` (or `close`) raises `TrackingOutage` naming the tracking URI:
the stage fails after its last checkpoint and `--resume` continues it.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

MAX_BATCH = 1000     # MLflow's log_batch limit on metrics per request
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
REQUEST_TIMEOUT_S = 30


def redacted(text: str, uri: str) -> str:
    """`text` with the credentials a tracking URI may carry (http://user:token@host) taken out."""
    userinfo = urlsplit(uri).netloc.rpartition("@")[0] if "://" in uri else ""
    return text.replace(userinfo + "@", "") if userinfo else text


class TrackingOutage(RuntimeError):
    """The tracking server has taken no metrics for longer than tracking.outage_limit_s."""


class MetricSender:
    """Queue metrics from the training thread; send them from a daemon thread, retrying until the limit."""

    def __init__(self, uri: str, run_id: str, outage_limit_s: float, retry_s: float = 2.0) -> None:
        self.uri, self.run_id, self.limit, self.retry_s = uri, run_id, outage_limit_s, retry_s
        # A tracking server: one bounded request per attempt, the retrying is ours (MLflow's client would retry
        # each call with backoff for ~4 minutes, so a server back after 60 s could wait another minute for us).
        # A local store (sqlite, files): MLflow's client.
        self.creds = get_default_host_creds(uri) if uri.startswith(("http://", "https://")) else None
        self.client = MlflowClient(uri) if self.creds is None else None
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.pending: list[tuple[float, Metric]] = []   # (when queued, monotonic seconds; the value)
        self.sent = 0
        self.failed_attempts = 0      # log_batch calls that raised (each one after MLflow's own retries)
        self.last_error = ""
        self.closing = False
        self.thread = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics; raises TrackingOutage once the server has been away past the limit."""
        self.check()
        now, stamp = time.monotonic(), int(time.time() * 1000)
        with self.lock:
            self.pending += [(now, Metric(key, float(value), stamp, step)) for key, value in metrics.items()]
        self.wake.set()

    def waited_s(self) -> float:
        """How long the oldest unsent value has waited (0 when nothing waits)."""
        with self.lock:
            return time.monotonic() - self.pending[0][0] if self.pending else 0.0

    def check(self) -> None:
        waited = self.waited_s()
        if waited > self.limit:
            with self.lock:
                unsent = len(self.pending)
            raise TrackingOutage(
                f"the MLflow tracking server {redacted(self.uri, self.uri)} has taken no metrics for {waited:.0f} s "
                f"(tracking.outage_limit_s={self.limit:g}): {unsent} metric value(s) of run {self.run_id} are "
                f"unsent after {self.failed_attempts} failed attempt(s), the last: {self.last_error}. Bring the "
                f"server back (or raise tracking.outage_limit_s) and continue the stage with --resume")

    def close(self) -> None:
        """Send what is queued, waiting while the server is away up to the limit; then stop the thread."""
        self.closing = True
        self.wake.set()
        while self.thread.is_alive():
            self.thread.join(timeout=min(1.0, self.retry_s))
            self.check()

    def _send_forever(self) -> None:
        while True:
            self.wake.wait(timeout=self.retry_s)
            self.wake.clear()
            with self.lock:
                batch = [metric for _, metric in self.pending[:MAX_BATCH]]
            if not batch:
                if self.closing:
                    return
                continue
            try:
                self._send(batch)
            except Exception as exc:   # unreachable, 5xx, timeouts: keep everything and try again
                self.failed_attempts += 1
                self.last_error = redacted(f"{type(exc).__name__}: {str(exc)[:300]}", self.uri)
                time.sleep(self.retry_s)
                continue
            with self.lock:
                del self.pending[:len(batch)]
                self.sent += len(batch)
                more = bool(self.pending)
            if more:
                self.wake.set()

    def _send(self, batch: list[Metric]) -> None:
        if self.client is not None:
            self.client.log_batch(self.run_id, metrics=batch)
            return
        metrics = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in batch]
        response = http_request(self.creds, LOG_BATCH, "POST", max_retries=0, timeout=REQUEST_TIMEOUT_S,
                                json={"run_id": self.run_id, "metrics": metrics})
        verify_rest_response(response, LOG_BATCH)
