"""Shared fixtures: an S3 API served by moto on 127.0.0.1 (stopped after the tests that use it); and the rule
that keeps `pytest -m "not slow"` fast: a test using a fixture that starts Ray, a server or Meta-World must be
marked slow."""

import pytest

# Fixtures (in any test module) that start Ray, a server or Meta-World episodes.
SLOW_FIXTURES = {"ray_local", "ray_s3", "ray_head", "s3_server", "mlflow_server", "stack_dir", "episodes", "policies",
                 "smoke_run", "shards"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray, a server or Meta-World but are not marked "
                                "@pytest.mark.slow: " + ", ".join(unmarked))


@pytest.fixture(scope="module")
def s3_server():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="actdistill")
    yield "s3://actdistill"
    mp.undo()
    server.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four scripted-expert episodes as shards (tests/fault_support.py); Ray, if a test started it, is shut down
    after the module."""
    import ray
    from fault_support import write_expert_shards

    folder = tmp_path_factory.mktemp("shards")
    yield write_expert_shards(str(folder))
    if ray.is_initialized():
        ray.shutdown()
