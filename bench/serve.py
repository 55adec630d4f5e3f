"""Serving bench: batch-1 latency of the raw policy, the MLflow pyfunc in process, and `mlflow models serve`.

    MUJOCO_GL=egl python bench/serve.py                      # a demo-sized student with random weights
    MUJOCO_GL=egl python bench/serve.py --policy runs/demo/student

The three paths answer the same Meta-World observations (rendered here, as the policy sees them), one call
per request, at 1 and 8 concurrent clients: p50/p99 per request and requests/s. At 1 client the raw policy
and the in-process pyfunc alternate call by call (the overhead target compares their p50s). The pyfunc is logged and
loaded exactly as promote registers it (signature, input example, models-from-code), in a throwaway sqlite
store. REST requests are the standard `{"inputs": ...}` JSON to a server on 127.0.0.1; their latency is the
client's round trip from an encoded body (the JSON encoding of a frame is timed on its own line). Every
path runs torch on one thread (OMP_NUM_THREADS=1 for the server), so 8 clients do not oversubscribe 2 cores.
Writes bench/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.policy import Policy  # noqa: E402
from pipeline.infra.stack import free_port, stop_group  # noqa: E402
from pipeline.models.checkpoint import PolicyCard, read_policy_config, save_policy  # noqa: E402
from pipeline.models.student import derive_student  # noqa: E402
from pipeline.models.vla import VLA, teacher_config  # noqa: E402
from pipeline.sim.tasks import instruction_for  # noqa: E402

BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "results"
TARGET_MS = 0.5   # the in-process pyfunc may add at most this to the raw policy's p50
Request = dict[str, np.ndarray]


def demo_student(folder: Path) -> str:
    """A student of demo.yaml's widths (8 layers, hidden 128, mlp stem) with random weights and router."""
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    torch.manual_seed(0)
    teacher = VLA(teacher_config(cfg.model, [cfg.collect.image_size] * 2 + [3], 4, 4)).eval()
    student = derive_student(teacher, cfg.router.hidden)
    normalizer = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
                  "proprio_std": [1.0] * 4}
    card = PolicyCard(normalizer=normalizer, role="student", teacher_hash="random", threshold=0.5,
                      instructions={t: instruction_for(t) for t in cfg.collect.tasks})
    save_policy(student, str(folder), card)
    return str(folder)


def observations(card: PolicyCard, count: int, camera: str) -> list[Request]:
    """Rendered first frames of Meta-World episodes (tasks of the card, seeds 0..): real requests."""
    from pipeline.sim.metaworld_env import SimEnv

    tasks = sorted(card.instructions or {}) or ["reach-v3"]
    size = (card.vla or {})["image_size"]
    out = []
    for i in range(count):
        env = SimEnv(tasks[i % len(tasks)], i, size, camera)
        obs = env.reset()
        out.append({"image": obs.image[None].astype(np.uint8), "instruction": np.array([env.instruction]),
                    "proprio": obs.proprio[None].astype(np.float32)})
        env.close()
    return out


def stats(ms: list[float], wall_s: float) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "requests_per_s": len(ms) / wall_s, "requests": len(ms)}


def drive(call: Callable[[int], Any], requests_total: int, clients: int) -> dict[str, float]:
    """`clients` threads, each sending its share of requests one after another; per-request times."""
    def client(ids: range) -> list[float]:
        times = []
        for i in ids:
            start = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - start) * 1000.0)
        return times

    share = requests_total // clients
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, [range(c * share, (c + 1) * share) for c in range(clients)]))
    return stats([t for p in parts for t in p], time.perf_counter() - start)


def paired(calls: dict[str, Callable[[int], Any]], requests_total: int) -> dict[str, dict[str, float]]:
    """One client, the paths' calls interleaved request by request, so machine noise hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(requests_total):
        for name, call in calls.items():
            start = time.perf_counter()
            call(i)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: stats(t, sum(t) / 1000.0) for name, t in times.items()}


def log_pyfunc(policy_uri: str, store: Path) -> str:
    """Log and register the student as promote does; the registered model's URI."""
    import mlflow

    from pipeline.tracking.registry import register_student
    from pipeline.tune.trials import TrialResult

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("serve-bench")
    candidate = TrialResult(trial="bench", params={}, student_uri=policy_uri, success=0.0, compute_ratio=1.0,
                            action_mse_norm=0.0, latency_ms_median=0.0)
    with mlflow.start_run():
        version = register_student("serve-bench", candidate, {})
    return f"models:/serve-bench/{version.version}"


def start_server(model_uri: str, store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except (requests.ConnectionError, requests.Timeout):   # not up yet, or busy starting
            pass
        time.sleep(0.5)
    stop_group(proc)
    raise TimeoutError(f"mlflow models serve did not answer on {url} within 240 s")


def body(request: Request) -> bytes:
    return json.dumps({"inputs": {k: v.tolist() for k, v in request.items()}}).encode()


def measure(policy_uri: str, calls: int, camera: str) -> dict[str, Any]:
    import mlflow

    torch.set_num_threads(1)
    card = read_policy_config(policy_uri)
    obs = observations(card, 16, camera)
    raw = Policy(policy_uri)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        model_uri = log_pyfunc(policy_uri, store)
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        for r in obs:   # the same answers, or the comparison is void
            np.testing.assert_allclose(pyfunc.predict(r), raw.act(r["image"], r["instruction"].tolist(),
                                                                   r["proprio"]), atol=1e-6)
        paths: dict[str, Callable[[int], Any]] = {
            "raw policy": lambda i: raw.act(obs[i % 16]["image"], obs[i % 16]["instruction"].tolist(),
                                            obs[i % 16]["proprio"]),
            "pyfunc in process": lambda i: pyfunc.predict(obs[i % 16]),
        }
        bodies = [body(r) for r in obs]
        start = time.perf_counter()
        for _ in range(10):
            [body(r) for r in obs]
        encode_ms = (time.perf_counter() - start) * 1000.0 / (10 * len(obs))
        proc, url = start_server(model_uri, store)
        try:
            sessions: dict[int, requests.Session] = {}

            def rest(i: int) -> Any:
                import threading

                session = sessions.setdefault(threading.get_ident(), requests.Session())
                reply = session.post(f"{url}/invocations", data=bodies[i % 16],
                                     headers={"Content-Type": "application/json"}, timeout=60)
                reply.raise_for_status()
                return reply.json()

            paths["mlflow models serve (REST)"] = rest
            for call in paths.values():   # warm up
                drive(call, 16, 1)
            results: dict[str, dict[str, Any]] = {name: {} for name in paths}
            in_process = {name: paths[name] for name in ("raw policy", "pyfunc in process")}
            for name, figures in paired(in_process, calls).items():
                results[name]["1 client"] = figures
            results["mlflow models serve (REST)"]["1 client"] = drive(rest, calls, 1)
            for name, call in paths.items():
                results[name]["8 clients"] = drive(call, calls, 8)
        finally:
            stop_group(proc)
    vla = card.vla or {}
    return {"policy": policy_uri, "layers": vla.get("num_layers"), "hidden": vla.get("hidden_size"),
            "image": vla.get("image_size"), "torch_threads": 1, "calls_per_setting": calls,
            "json_encode_ms_per_frame": encode_ms, "results": results,
            "pyfunc_overhead_p50_ms": results["pyfunc in process"]["1 client"]["p50_ms"]
            - results["raw policy"]["1 client"]["p50_ms"],
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Serving bench: {result['machine']}; policy {result['policy']} ({result['layers']} layers, hidden "
             f"{result['hidden']}, {result['image']}x{result['image']} images); torch on 1 thread; "
             f"{result['calls_per_setting']} batch-1 requests per setting.", "",
             "| path | clients | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|"]
    for name, settings in result["results"].items():
        for clients, s in settings.items():
            lines.append(f"| {name} | {clients.split()[0]} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                         f"{s['requests_per_s']:.0f} |")
    overhead = result["pyfunc_overhead_p50_ms"]
    lines += ["", f"In-process pyfunc over the raw policy at p50: {overhead:+.2f} ms (target <= {TARGET_MS} ms: "
              f"{'met' if overhead <= TARGET_MS else 'NOT met'}). JSON encoding of one frame's request on the "
              f"client: {result['json_encode_ms_per_frame']:.2f} ms (not in the REST figures)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="a student (or teacher) policy folder; default: a random demo-sized one")
    parser.add_argument("--calls", type=int, default=400, help="requests per path and client count")
    parser.add_argument("--camera", default="corner", help="Meta-World camera of the observations")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy or demo_student(Path(tmp) / "student")
        result = measure(policy, args.calls, args.camera)
    if not args.policy:
        result["policy"] = "random demo-sized student (jobs/configs/demo.yaml widths)"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps(result, indent=2))
    (OUT / "serve.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0 if result["pyfunc_overhead_p50_ms"] <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
