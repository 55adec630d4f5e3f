"""`actdistill stack up|down|env|status`: a Ray head, an MLflow server and an S3 API (moto) on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DEFAULT_DIR = "runs/stack"
STATE_FILE = "stack.json"
# Every process a service starts inherits this variable (Ray workers and job drivers included), so
# `down` stops exactly the processes of this stack, whatever session or process group they moved to.
MARKER = "ACTDISTILL_STACK"
# moto accepts any key; these dummies are only ever handed to processes that talk to the local S3 API.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}
# Ports away from Ray's defaults (6379/8265/10001/52365) so a stack can sit beside another Ray.
DEFAULT_PORTS = {"ray_port": 6390, "dashboard_port": 8270, "mlflow_port": 5055, "s3_port": 9055}
START_TIMEOUT_S = 300.0  # MLflow is healthy in ~6 s idle, but took 70 s on a 2-core machine at load 28
STOP_GRACE_S = 10.0      # gcs_server ignores SIGTERM for a while; SIGKILL follows after this


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says what to change."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a server started with start_new_session=True and every process it forked (`mlflow models serve`
    runs uvicorn under it): SIGTERM to its process group, SIGKILL after `grace_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _require_free(port: int, flag: str) -> None:
    # Ray's GCS listens on every interface, so test the wildcard address.
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            raise StackError(f"{flag}={port}: the port is in use; pass another, e.g. {flag}={port + 1}, "
                             f"or 0 to pick a free one") from None


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: Ctrl-C in the shell that ran `up` does not reach the services.
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _log_tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return None


def _wait_http(name: str, url: str, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _http_status(url) == 200:
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} before {url} answered; "
                             f"its log {log} ends with:\n{_log_tail(log)}")
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {START_TIMEOUT_S:.0f} s; see {log}")


def _python_env(stack_id: str, service: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    env[MARKER] = f"{stack_id}/{service}"
    # Ray job entrypoints say `python`: make that this interpreter, whatever PATH the shell had.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_s3(stack_dir: Path, stack_id: str, port: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    """moto's S3 API; returns at once (`wait_ready` checks it)."""
    log = stack_dir / "logs" / "s3.log"
    argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    proc = _spawn(argv, _python_env(stack_id, "s3"), log)
    return proc, {"pid": proc.pid, "url": f"http://{HOST}:{port}", "log": str(log)}


def start_mlflow(stack_dir: Path, stack_id: str, port: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    """An MLflow tracking server on sqlite with artifacts proxied from a local folder."""
    log = stack_dir / "logs" / "mlflow.log"
    argv = [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{stack_dir / 'mlflow.db'}",
            "--artifacts-destination", str(stack_dir / "artifacts"),
            "--host", HOST, "--port", str(port), "--workers", "1"]
    proc = _spawn(argv, _python_env(stack_id, "mlflow"), log)
    return proc, {"pid": proc.pid, "url": f"http://{HOST}:{port}", "log": str(log)}


def start_ray_head(stack_dir: Path, stack_id: str, port: int, dashboard_port: int, num_cpus: int,
                   extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """`ray start --head` with its dashboard (and job server) on 127.0.0.1; blocks until the head is up."""
    log = stack_dir / "logs" / "ray.log"
    # Unix socket paths inside the temp dir must stay under ~107 bytes, so it lives in /tmp, and a
    # temp dir of our own keeps `ray.init()` elsewhere on this machine from finding this head.
    temp_dir = tempfile.mkdtemp(prefix="actdistill-ray-")
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--node-ip-address={HOST}",
            f"--port={port}", "--include-dashboard=true", f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        return _start_head(argv, temp_dir, dashboard_port, _python_env(stack_id, "ray", extra_env), log)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _start_head(argv: list[str], temp_dir: str, dashboard_port: int, env: dict[str, str],
                log: Path) -> dict[str, Any]:
    proc = _spawn(argv, env, log)
    info = {"pid": proc.pid, "temp_dir": temp_dir, "log": str(log),
            "dashboard_url": f"http://{HOST}:{dashboard_port}"}
    if proc.wait(timeout=START_TIMEOUT_S) != 0:
        raise StackError(f"`ray start --head` failed (code {proc.returncode}); {log} ends with:\n{_log_tail(log)}")
    # Ray replaces 127.0.0.1 by the node's address for the GCS; read back what it chose.
    info["gcs_address"] = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
    _wait_http("the Ray dashboard", f"{info['dashboard_url']}/api/gcs_healthz", log)
    # Ray 2.60 turns on token auth when a token exists (~/.ray/auth_token): clients then need
    # RAY_AUTH_MODE=token to send it. A 401 without a token tells us which mode the head runs.
    info["auth_mode"] = "token" if _http_status(f"{info['dashboard_url']}/api/version") == 401 else "disabled"
    return info


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """The variables a shell (or a test) exports to use this stack."""
    ray_info, env = state["services"]["ray"], {}
    env["RAY_ADDRESS"] = ray_info["gcs_address"]
    env["RAY_API_SERVER_ADDRESS"] = ray_info["dashboard_url"]
    if ray_info["auth_mode"] == "token":
        env["RAY_AUTH_MODE"] = "token"
    env["MLFLOW_TRACKING_URI"] = state["services"]["mlflow"]["url"]
    env["AWS_ENDPOINT_URL"] = state["services"]["s3"]["url"]
    env.update(MOTO_CREDENTIALS)
    return env


def state_path(stack_dir: str | Path) -> Path:
    return Path(stack_dir) / STATE_FILE


def read_state(stack_dir: str | Path) -> dict[str, Any]:
    path = state_path(stack_dir)
    if not path.exists():
        raise StackError(f"no stack state at {path}; start one with `actdistill stack up --dir {stack_dir}`")
    return json.loads(path.read_text())


def _proc_is_live(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited; only its parent's wait is due


def stack_pids(stack_id: str) -> list[int]:
    """Live processes carrying this stack's marker (Linux /proc)."""
    needle = f"{MARKER}={stack_id}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone already, or another user's process
            continue
        if any(var.startswith(needle) for var in environ.split(b"\0")) and _proc_is_live(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(stack_id: str, grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM every process of the stack, SIGKILL what is left after `grace_s`; returns the PIDs seen."""
    seen = stack_pids(stack_id)
    _signal_all(seen, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_proc_is_live(p) for p in seen):
        time.sleep(0.2)
    for _ in range(3):  # a dying parent may fork once more (Ray restarts workers); sweep again
        left = stack_pids(stack_id)
        if not left:
            break
        seen += [p for p in left if p not in seen]
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.5)
    return sorted(set(seen))


def up(stack_dir: Path, ports: dict[str, int], num_cpus: int) -> dict[str, Any]:
    """Start the three services, write the state file, return the state."""
    stack_dir = stack_dir.resolve()
    if state_path(stack_dir).exists() and stack_pids(read_state(stack_dir)["stack_id"]):
        raise StackError(f"a stack is already running from {state_path(stack_dir)}; stop it with "
                         f"`actdistill stack down --dir {stack_dir}` or pass another --dir")
    ports = {flag: port or free_port() for flag, port in ports.items()}
    for flag, port in ports.items():
        _require_free(port, "--" + flag.replace("_", "-"))
    stack_id = uuid.uuid4().hex[:12]
    state: dict[str, Any] = {"stack_id": stack_id, "dir": str(stack_dir), "services": {}, "env": {}}
    # Written before anything starts: `down` can stop a stack whose `up` was killed halfway.
    stack_dir.mkdir(parents=True, exist_ok=True)
    state_path(stack_dir).write_text(json.dumps(state, indent=2))
    try:
        s3_proc, state["services"]["s3"] = start_s3(stack_dir, stack_id, ports["s3_port"])
        mlflow_proc, state["services"]["mlflow"] = start_mlflow(stack_dir, stack_id, ports["mlflow_port"])
        # Jobs on this head read and write s3:// through the local S3 API.
        head_env = {"AWS_ENDPOINT_URL": state["services"]["s3"]["url"], **MOTO_CREDENTIALS}
        state["services"]["ray"] = start_ray_head(stack_dir, stack_id, ports["ray_port"],
                                                  ports["dashboard_port"], num_cpus, head_env)
        _wait_http("moto (S3 API)", state["services"]["s3"]["url"] + "/moto-api/",
                   Path(state["services"]["s3"]["log"]), s3_proc)
        _wait_http("MLflow", state["services"]["mlflow"]["url"] + "/health",
                   Path(state["services"]["mlflow"]["log"]), mlflow_proc)
    except BaseException:
        stop_processes(stack_id)
        _remove_ray_temp(state)
        state_path(stack_dir).unlink(missing_ok=True)
        raise
    state["env"] = client_env(state)
    state_path(stack_dir).write_text(json.dumps(state, indent=2))
    return state


def _remove_ray_temp(state: dict[str, Any]) -> None:
    temp_dir = state["services"].get("ray", {}).get("temp_dir")
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def down(stack_dir: Path) -> list[int]:
    """Stop every process the stack started; returns their PIDs. The state file is removed."""
    state = read_state(stack_dir)
    pids = stop_processes(state["stack_id"])
    _remove_ray_temp(state)
    state_path(stack_dir).unlink()
    return pids


def _print_up(state: dict[str, Any]) -> None:
    svc = state["services"]
    print(f"stack up; state in {state_path(state['dir'])}")
    print(f"  ray head    {svc['ray']['gcs_address']}  jobs + dashboard {svc['ray']['dashboard_url']}")
    print(f"  mlflow      {svc['mlflow']['url']}  (pass tracking.tracking_uri={svc['mlflow']['url']})")
    print(f"  s3 (moto)   {svc['s3']['url']}  (dummy credentials, for this local S3 API only)")
    print("use it from this shell with:  eval \"$(actdistill stack env)\"")
    _print_env(state)


def _print_env(state: dict[str, Any]) -> None:
    for key, value in state["env"].items():
        print(f"export {key}={value}")


def _status(state: dict[str, Any]) -> int:
    pids = stack_pids(state["stack_id"])
    print(f"stack {state['stack_id']} in {state['dir']}: {len(pids)} live processes")
    svc = state["services"]
    checks = {"ray": svc["ray"]["dashboard_url"] + "/api/gcs_healthz",
              "mlflow": svc["mlflow"]["url"] + "/health", "s3": svc["s3"]["url"] + "/moto-api/"}
    healthy = True
    for name, url in checks.items():
        code = _http_status(url)
        healthy &= code == 200
        print(f"  {name:7s} {url} -> {code or 'no answer'}")
    return 0 if healthy else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actdistill stack",
                                description="A local Ray head, MLflow server and S3 API on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "env", "status"])
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"state, logs, MLflow store (default {DEFAULT_DIR})")
    for flag, port in DEFAULT_PORTS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=port, help=f"default {port}; 0 = any free")
    # 4 logical CPUs on 2 cores, as in jobs/configs/smoke.yaml: train workers, a Tune trial and
    # Ray Data's read tasks must all fit at once or the read waits forever.
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head (default 4)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "up":
            ports = {flag: getattr(args, flag) for flag in DEFAULT_PORTS}
            _print_up(up(Path(args.dir), ports, args.num_cpus))
        elif args.action == "down":
            pids = down(Path(args.dir))
            print(f"stack down: stopped {len(pids)} processes")
        elif args.action == "env":
            _print_env(read_state(args.dir))
        else:
            return _status(read_state(args.dir))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
