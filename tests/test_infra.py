"""Cluster manifests: they parse, name GPU workers, run job modules and configs that exist, and hold no secrets."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.stages import RunPaths

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_KEY = re.compile(r"(secret|password|passwd|token|access_key|private_key|api_key)", re.IGNORECASE)


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _scalars(node, key=""):
    """(key, value) for every scalar in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _scalars(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _scalars(v, key)
    else:
        yield key, node


def _cluster_specs():
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] == "RayCluster":
                yield path.name, doc["spec"]
            elif doc["kind"] == "RayJob":
                yield path.name, doc["spec"]["rayClusterSpec"]


def _gpus(group):
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def _containers(cluster):
    pod_specs = [cluster["headGroupSpec"]["template"]["spec"]]
    pod_specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return [c for spec in pod_specs for c in spec["containers"]]


def test_there_is_something_to_check():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-distill.yaml", "kuberay/rayjob-sweep.yaml",
            "aws/cluster.yaml", "configs/cluster.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_and_opens_with_the_command_that_uses_it(path):
    assert _docs(path)
    assert path.read_text().startswith("# "), "STYLE 6: the first line is a comment giving the command"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_the_required_fields(path):
    for doc in _docs(path):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] in {"RayCluster", "RayJob"}
        assert doc["metadata"]["name"]
        assert doc["spec"]


def test_every_cluster_has_a_cpu_head_and_gpu_workers_at_the_pinned_ray():
    pinned = re.search(r'ray\[[^\]]*\]==([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)
    specs = list(_cluster_specs())
    assert len(specs) == 3
    for name, cluster in specs:
        assert str(cluster["rayVersion"]) == pinned, name
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), name
        gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g) >= 1]
        assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
        for group in gpu_groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


def test_containers_take_settings_from_a_secret_not_inline_env():
    for name, cluster in _cluster_specs():
        for container in _containers(cluster):
            assert {"secretRef": {"name": "actdistill-env"}} in container["envFrom"], name
            for var in container.get("env", []):
                assert "value" not in var or not SECRET_KEY.search(var["name"]), (name, var["name"])


@pytest.mark.parametrize("path", sorted((INFRA / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_a_job_module_with_a_valid_config(path):
    (doc,) = _docs(path)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    assert (ROOT / "jobs" / f"{argv[2].removeprefix('jobs.')}.py").is_file(), argv[2]
    config = argv[argv.index("--config") + 1]
    overrides = [f"sweep.space={argv[argv.index('--space') + 1]}"] if "--space" in argv else []
    for file in [config, *(o.split("=", 1)[1] for o in overrides)]:
        assert (ROOT / file).is_file(), file
    load_config(str(ROOT / config), overrides)  # raises ConfigError naming every bad key


def test_cluster_config_is_a_cluster_setting():
    cfg = load_config(str(INFRA / "configs" / "cluster.yaml"), [])
    assert Path(cfg.run.run_dir).is_absolute()  # a job's working directory is a throw-away copy
    assert RunPaths.of(cfg).shards.startswith("s3://") and cfg.tracking_uri.startswith("http")


def test_ray_up_config_has_gpu_workers_and_installs_the_project():
    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())
    assert any("pip install" in cmd and "actdistill" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize("path", [*YAML_FILES, *INFRA.rglob("Dockerfile")],
                         ids=lambda p: p.relative_to(INFRA).as_posix())
def test_no_value_looks_like_a_credential(path):
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), "an AWS access key id"
    assert not re.search(r"aws_secret_access_key\s*[:=]\s*\S", text, re.IGNORECASE), "an inline AWS secret key"
    if path.suffix in {".yaml", ".yml"}:
        for doc in _docs(path):
            for key, value in _scalars(doc):
                if SECRET_KEY.search(key) and isinstance(value, str) and value:
                    pytest.fail(f"{path.name}: {key} holds a literal value; use a Secret or the instance role")
