"""The Meta-World adapter: one rendered task instance, its observations, and scripted expert episodes."""

from __future__ import annotations

import os

# EGL renders headless on Mesa/llvmpipe; must be chosen before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.sim.tasks import instruction_for

ACTION_DIM = 4  # (dx, dy, dz, gripper) for every Meta-World task
PROPRIO_DIM = 4  # hand xyz + gripper opening: what the policy may know about its own body


@dataclass(frozen=True)
class Observation:
    """What a policy sees: a rendered frame and proprioception, never object positions.

    The full 39-D state (object and goal poses) is privileged; it stays inside SimEnv, where only the
    scripted expert reads it (SimEnv.expert_state), so no policy can be handed it by mistake.
    """

    image: np.ndarray  # (H, W, 3) uint8
    proprio: np.ndarray  # (4,) float32: hand xyz, gripper opening


@dataclass
class Episode:
    """One expert episode, step-aligned: images[t], proprio[t] are seen before actions[t] is taken."""

    episode_id: str
    task: str
    seed: int
    instruction: str
    images: np.ndarray  # (T, H, W, 3) uint8
    proprio: np.ndarray  # (T, 4) float32
    actions: np.ndarray  # (T, 4) float32
    success: bool

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])


def episode_id(task: str, seed: int) -> str:
    return f"{task}/s{seed:06d}"


def _build_env(task: str, seed: int) -> Any:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE as envs

    key = f"{task}-goal-observable"
    if key not in envs:
        raise KeyError(f"task {task!r} has no Meta-World v3 environment {key!r}; "
                       f"choose a task from pipeline/sim/tasks.py")
    # The seed fixes object and goal placement; the env keeps it frozen across resets.
    return envs[key](seed=seed)


class SimEnv:
    """A Meta-World task instance rendered from one camera; step() reports success."""

    def __init__(self, task: str, seed: int, image_size: int, camera: str = "corner") -> None:
        import mujoco

        self._instruction = instruction_for(task)  # unknown task -> KeyError listing choices
        self.task, self.seed, self.camera = task, seed, camera
        self._env = _build_env(task, seed)
        cameras = [self._env.model.camera(i).name for i in range(self._env.model.ncam)]
        if camera not in cameras:
            raise KeyError(f"camera {camera!r} does not exist in {task}; choose from: {', '.join(cameras)}")
        # Default offscreen quality (4x MSAA, 4096 shadow map) costs ~80 ms/frame; off it is ~10 ms.
        self._env.model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(self._env.model, image_size, image_size)
        self._raw: np.ndarray | None = None

    @property
    def instruction(self) -> str:
        return self._instruction

    def reset(self) -> Observation:
        raw, _ = self._env.reset()
        return self._observe(raw)

    def expert_state(self) -> np.ndarray:
        """The privileged 39-D simulator state after the last reset/step: for scripted experts only."""
        if self._raw is None:
            raise RuntimeError(f"SimEnv({self.task}, seed={self.seed}) has no state yet; call reset() first")
        return self._raw

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action has shape {action.shape}; Meta-World expects ({ACTION_DIM},) "
                             f"= (dx, dy, dz, gripper)")
        raw, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        return self._observe(raw), bool(info["success"])

    def close(self) -> None:
        # Closing the renderer explicitly avoids EGL tracebacks at interpreter exit.
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def _observe(self, raw: np.ndarray) -> Observation:
        self._raw = np.asarray(raw, dtype=np.float64)
        # Meta-World's state starts with hand xyz and the gripper opening; the rest is object state.
        proprio = self._raw[:PROPRIO_DIM].astype(np.float32)
        return Observation(image=self._render(), proprio=proprio)

    def _render(self) -> np.ndarray:
        import mujoco

        if self._renderer is None:
            raise RuntimeError(f"SimEnv({self.task}, seed={self.seed}) is closed; create a new one")
        self._renderer.update_scene(self._env.data, camera=self.camera)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # The Meta-World cameras (corner included) come out upside down.
        return np.ascontiguousarray(self._renderer.render()[::-1])


def expert_action(policy: Any, env: SimEnv) -> np.ndarray:
    """The scripted expert's action from the privileged state; its over-range warning is noise."""
    with warnings.catch_warnings():
        # The expert's P-controller often exceeds [-1, 1]; the env clips, so the warning says nothing.
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        return np.asarray(policy.get_action(env.expert_state()), dtype=np.float32)


def run_expert_episode(task: str, seed: int, image_size: int, camera: str = "corner",
                       max_steps: int = 150, action_noise: float = 0.0) -> Episode:
    """Roll out the scripted expert until first success (that step included) or max_steps.

    With action_noise > 0 the executed hand motion is the expert's plus Gaussian noise of that std (DART-style
    noise injection), while the stored action stays the expert's clean action for the state reached: the
    expert is a feedback controller of the true state, so its label is right wherever the noise led. The
    episode then shows how to recover from the small drifts a cloned policy makes in closed loop. The noise
    is seeded by the episode seed, so collection stays reproducible."""
    from metaworld.policies import ENV_POLICY_MAP

    env = SimEnv(task, seed, image_size, camera)
    policy = ENV_POLICY_MAP[task]()
    rng = np.random.default_rng([seed, 0xDA27])
    images, proprio, actions, success = [], [], [], False
    try:
        obs = env.reset()
        for _ in range(max_steps):
            action = np.clip(expert_action(policy, env), -1.0, 1.0)
            images.append(obs.image)
            proprio.append(obs.proprio)
            actions.append(action)
            executed = action.copy()
            if action_noise > 0:
                executed[:3] += rng.normal(0.0, action_noise, size=3).astype(np.float32)
            obs, success = env.step(executed)
            if success:
                break
    finally:
        env.close()
    return Episode(episode_id=episode_id(task, seed), task=task, seed=seed, instruction=env.instruction,
                   images=np.stack(images), proprio=np.stack(proprio).astype(np.float32),
                   actions=np.stack(actions).astype(np.float32), success=success)
