"""The registered student as MLflow serves it in process: signature, numpy requests, refusals, concurrency."""

from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from pipeline.evaluate.policy import Policy
from pipeline.models.checkpoint import PolicyCard, save_policy
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig
from pipeline.tracking.registry import register_student
from pipeline.tune.trials import TrialResult

NORMALIZER = {"action_mean": [0.1, -0.2, 0.0, 0.5], "action_std": [0.5, 0.5, 0.5, 1.0],
              "proprio_mean": [0.0, 0.6, 0.2, 0.5], "proprio_std": [0.1, 0.1, 0.1, 0.3]}
INSTRUCTIONS = {"reach-v3": "reach to the goal position", "push-v3": "push the puck to the goal"}


def mixed_router_student():
    """A 6-layer student whose router opens different layers for different inputs."""
    torch.manual_seed(0)
    teacher = VLA(VLAConfig(backbone="llama", hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32,
                            patch_size=8, proprio_dim=4, action_dim=4))
    student = derive_student(teacher, 16)
    torch.nn.init.normal_(student.router.out.weight, std=3.0)
    return student


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The student registered as promote registers it (sqlite store), and loaded back by its models:/ URI."""
    folder = tmp_path_factory.mktemp("serving")
    uri = str(folder / "student")
    save_policy(mixed_router_student(), uri, PolicyCard(normalizer=NORMALIZER, role="student", threshold=0.5,
                                                        teacher_hash="t" * 16, instructions=INSTRUCTIONS))
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    store = f"sqlite:///{folder / 'mlflow.db'}"
    # The registry too: a registry URI another test left in this process must not receive this model.
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        mlflow.set_experiment("serving")
        candidate = TrialResult(trial="s", params={}, student_uri=uri, success=1.0, compute_ratio=0.5,
                                action_mse_norm=0.1, latency_ms_median=1.0)
        with mlflow.start_run():
            version = register_student("serving-test", candidate, {})
        model_uri = f"models:/serving-test/{version.version}"
        yield model_uri, mlflow.pyfunc.load_model(model_uri), Policy(uri)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def requests_of(count, seed=0):
    rng = np.random.default_rng(seed)
    words = list(INSTRUCTIONS.values())
    return [{"image": rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8),
             "instruction": np.array([words[i % 2]]),
             "proprio": rng.normal(0.4, 0.2, (1, 4)).astype(np.float32)} for i in range(count)]


def raw(policy, request):
    return policy.act(request["image"], request["instruction"].tolist(), request["proprio"])


def test_the_registered_model_carries_a_tensor_signature_and_an_input_example(served):
    model_uri, model, _ = served
    info = mlflow.models.get_model_info(model_uri)
    inputs = {spec.name: (spec.type, spec.shape) for spec in info.signature.inputs.inputs}
    assert inputs == {"image": (np.dtype(np.uint8), (-1, 32, 32, 3)), "instruction": (np.dtype(str), (-1,)),
                      "proprio": (np.dtype(np.float32), (-1, 4))}
    assert info.signature.outputs.inputs[0].shape == (-1, 4)
    example = mlflow.models.Model.load(model_uri).load_input_example(mlflow.artifacts.download_artifacts(model_uri))
    assert example["image"].shape == (1, 32, 32, 3) and example["instruction"][0] in INSTRUCTIONS.values()
    assert model.predict(example).shape == (1, 4)


def test_numpy_requests_get_the_policys_own_actions_and_a_batch_too(served):
    _, model, policy = served
    reqs = requests_of(4)
    for r in reqs:
        answer = model.predict(r)
        assert answer.dtype == np.float32 and answer.shape == (1, 4)
        np.testing.assert_allclose(answer, raw(policy, r), atol=1e-6, rtol=0)
    batch = {k: np.concatenate([r[k] for r in reqs]) for k in reqs[0]}
    np.testing.assert_allclose(model.predict(batch), np.concatenate([raw(policy, r) for r in reqs]), atol=1e-5)
    # A DataFrame of flattened rows (what a client of the pre-signature model sent) still answers the same.
    frame = pd.DataFrame({"image": [r["image"].reshape(-1).tolist() for r in reqs],
                          "instruction": [r["instruction"][0] for r in reqs],
                          "proprio": [r["proprio"][0].tolist() for r in reqs]})
    np.testing.assert_allclose(model.predict(frame), model.predict(batch), atol=1e-6)


@pytest.mark.parametrize("change, field", [
    (lambda r: {**r, "image": np.zeros((1, 16, 16, 3), np.uint8)}, "(1, 16, 16, 3)"),
    (lambda r: {k: v for k, v in r.items() if k != "proprio"}, "proprio"),
    (lambda r: {**r, "proprio": np.array([[0.1, np.nan, 0.2, 0.3]], np.float32)}, "proprio row(s) [0]"),
    (lambda r: {**r, "proprio": np.zeros((2, 4), np.float32)}, "image, instruction and proprio hold 1, 1 and 2"),
])
def test_a_malformed_request_is_refused_naming_the_field_and_the_model_keeps_answering(served, change, field):
    _, model, policy = served
    good = requests_of(1)[0]
    with pytest.raises(MlflowException) as err:
        model.predict(change(good))
    assert err.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)   # HTTP 400 when served
    assert field in err.value.message
    np.testing.assert_allclose(model.predict(good), raw(policy, good), atol=1e-6)


def test_32_concurrent_requests_get_the_answers_they_get_one_by_one(served):
    _, model, policy = served
    reqs = requests_of(32, seed=1)
    patterns = {tuple(policy.step(r["image"], r["instruction"].tolist(), r["proprio"]).executed[0]) for r in reqs}
    assert len(patterns) > 1, "the test needs requests whose router opens different layers"
    alone = [model.predict(r) for r in reqs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(model.predict, reqs))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    # No state of those calls stays on the model once they have ended.
    state = policy.model.gate_state
    assert state.gates is None and state.run is None and state.run_any == [] and state.hidden is None
