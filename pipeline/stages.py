"""The stage graph, declared once: each stage's job, the stages and config sections its output depends on,
and the folders it writes. `run`, `--resume`, the sweep, evaluate and the benches read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data import storage
from pipeline.errors import MissingInput


@dataclass(frozen=True)
class RunPaths:
    """Where every stage of one run reads and writes; derived from the config, nowhere else."""

    root: Path          # run.run_dir, absolute
    shards: str         # trajectory shards + manifest.json: a local folder or s3:// URI
    labelled: str       # probe-teacher's labelled shards + labels.json: a local folder or s3:// URI

    @classmethod
    def of(cls, cfg: PipelineConfig) -> RunPaths:
        root = Path(cfg.run.run_dir).resolve()
        return cls(root=root, shards=cfg.data.shards_uri or str(Path(cfg.run.run_dir) / "shards"),
                   labelled=cfg.data.labelled_uri or str(Path(cfg.run.run_dir) / "labelled"))

    @property
    def teacher(self) -> Path:
        """train-teacher's policy: model.safetensors + config.json."""
        return self.root / "teacher"

    @property
    def probes(self) -> Path:
        """probe-teacher's stage-1 probes: probes.safetensors + probes.json."""
        return self.root / "probes"

    @property
    def student(self) -> Path:
        """distill's routed student: model.safetensors + config.json."""
        return self.root / "student"

    @property
    def evaluate(self) -> Path:
        """evaluate's report.json, report.md and layers.png."""
        return self.root / "evaluate"

    @property
    def sweep(self) -> Path:
        """sweep's trials.json, frontier.md, frontier.png and one folder per trial."""
        return self.root / "sweep"

    @property
    def ray(self) -> Path:
        """Ray Train and Tune storage: checkpoints, run records, ledgers."""
        return self.root / "ray"

    @property
    def validation(self) -> Path:
        """The shard validation report, reused by every stage while the shards are unchanged."""
        return self.root / "validation"

    def under(self, where: str) -> str:
        """A folder named in the config: relative to run.run_dir, or an absolute path / URI as given."""
        return where if storage.has_scheme(where) or Path(where).is_absolute() else str(self.root / where)


@dataclass(frozen=True)
class Stage:
    name: str                     # the verb: `actdistill NAME`
    job: str                      # its module under jobs/
    after: tuple[str, ...]        # the stages whose outputs it reads
    sections: tuple[str, ...]     # the config sections (dotted for one field) its own work reads
    output: tuple[str, str] | None  # (RunPaths folder, file) whose presence shows the output is complete
    resumable: bool = False       # one Ray Train run that --resume can continue from a checkpoint

    def done_file(self, paths: RunPaths) -> str | None:
        if self.output is None:
            return None
        folder, name = self.output
        return storage.join(str(getattr(paths, folder)), name)

    def require(self, paths: RunPaths) -> Path:
        """The local file that shows this stage's output, for a later stage that cannot run without it."""
        done = self.done_file(paths)
        if done is None or not Path(done).is_file():
            raise MissingInput(f"{done} not found; run `actdistill {self.name}` with this config first")
        return Path(done)


# In run order. `sections` lists only what the stage itself reads; what its output depends on also includes
# the sections of every stage before it (inputs()).
STAGES: tuple[Stage, ...] = (
    Stage("collect", "collect", (), ("collect",), ("shards", "manifest.json")),
    Stage("train-teacher", "train_teacher", ("collect",), ("data", "model", "teacher", "run.seed"),
          ("teacher", "model.safetensors"), resumable=True),
    Stage("probe-teacher", "probe_teacher", ("train-teacher",), ("probe",), ("labelled", "labels.json")),
    Stage("distill", "distill", ("probe-teacher",), ("router", "distill"), ("student", "model.safetensors"),
          resumable=True),
    Stage("evaluate", "evaluate", ("distill",), ("evaluate",), ("evaluate", "report.json")),
    # The sweep distills and evaluates its own students from the teacher's labels; it reads the evaluate
    # report only for the teacher's point on the frontier.
    Stage("sweep", "sweep", ("probe-teacher", "evaluate"), ("sweep",), ("sweep", "trials.json")),
    Stage("promote", "promote", ("evaluate", "sweep"), ("promote",), None),
)
BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(BY_NAME)}")
    return BY_NAME[name]


def upstream(name: str) -> tuple[str, ...]:
    """The stages whose outputs `name` reads, directly or through another stage, in run order."""
    seen: set[str] = set()
    todo = list(stage(name).after)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(stage(current).after)
    return tuple(s.name for s in STAGES if s.name in seen)


def inputs(name: str) -> tuple[str, ...]:
    """The config sections the output of `name` depends on: its own and those of every stage upstream."""
    keys = [key for up in (*upstream(name), name) for key in stage(up).sections]
    return tuple(sorted(set(keys)))


def inputs_digest(cfg: PipelineConfig, name: str) -> str:
    """What --resume and the bench's --reuse compare: a change elsewhere (promote.model_name, say) does not
    make a distill stale; a change to its inputs (router.budget) does."""
    return cfg.digest(inputs(name))
