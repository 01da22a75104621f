"""Where metrics go: TensorBoard always; MLflow and Weights & Biases when asked (`track.*`).

Each sink gets the same calls from :class:`~tfpretrain.training.callbacks.StepLogger`:
``start(cfg)``, ``scalars(step, {tag: value})`` for every step, ``text(step, tag, text)``
at evaluations, ``finish(summary, files)`` at the end. A resumed run continues its MLflow
and W&B runs (their ids are kept in ``<run>/tracking.json``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tfpretrain.config import flatten
from tfpretrain.errors import UserError


class _Ids:
    """Run ids of external trackers, persisted in the run folder for resumes."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "tracking.json"

    def get(self, key):
        return json.loads(self.path.read_text()).get(key) if self.path.exists() else None

    def set(self, key, value):
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data[key] = value
        self.path.write_text(json.dumps(data, indent=1))


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        import tensorflow as tf

        self._tf = tf
        self.train = tf.summary.create_file_writer(str(Path(log_dir) / "train"))
        self.val = tf.summary.create_file_writer(str(Path(log_dir) / "val"))

    def start(self, cfg):
        pass

    def scalars(self, step, values: dict):
        for tag, value in values.items():
            split, name = tag.split("/", 1)
            with (self.val if split == "val" else self.train).as_default():
                self._tf.summary.scalar(name, value, step=step)

    def text(self, step, tag, text):
        split, name = tag.split("/", 1)
        with (self.val if split == "val" else self.train).as_default():
            self._tf.summary.text(name, text, step=step)

    def flush(self):
        self.train.flush()
        self.val.flush()

    def finish(self, summary, files):
        self.flush()


class MlflowSink:
    """MLflow: params, per-step metrics (batched), text samples and artifacts."""

    def __init__(self, run_dir: Path, uri: str | None, experiment: str):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError("track.mlflow needs MLflow: pip install 'tfpretrain[mlflow]'") \
                from None
        self.run_dir, self.experiment = Path(run_dir), experiment
        self.uri = uri or f"file:{Path('mlruns').resolve()}"
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3 keeps the local file store behind an opt-in; a local store is the
            # zero-setup default a user expects
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.ids = _Ids(run_dir)
        self.run_id = None
        self._pending = []

    def start(self, cfg):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        run_id = self.ids.get("mlflow_run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment)
            run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                         tags={"tfpretrain.run_dir": str(self.run_dir)})
            run_id = run.info.run_id
            self.ids.set("mlflow_run_id", run_id)
            params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def scalars(self, step, values: dict):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(tag, float(v), now, int(step)) for tag, v in values.items()
                          if v == v]  # MLflow rejects NaN; the guard logs skipped steps
        if len(self._pending) >= 500:
            self.flush()

    def text(self, step, tag, text):
        self.client.log_text(self.run_id, text, f"{tag.replace('/', '_')}_{step:08d}.txt")

    def flush(self):
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending = []

    def finish(self, summary, files):
        self.flush()
        if summary:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(f"final/{k}", float(v), now, int(summary.get("steps", 0)))
                for k, v in summary.items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and v == v])
        for f in files:
            if Path(f).exists():
                self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, status="FINISHED" if summary else "KILLED")


class WandbSink:
    """Weights & Biases; offline mode (files under <run>/wandb) when no API key is set."""

    def __init__(self, run_dir: Path, project: str):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("track.wandb needs wandb: pip install wandb") from None
        self.run_dir, self.project = Path(run_dir), project
        self.ids = _Ids(run_dir)
        self.run = None

    def start(self, cfg):
        import wandb

        import uuid

        run_id = self.ids.get("wandb_run_id") or uuid.uuid4().hex[:12]
        self.ids.set("wandb_run_id", run_id)
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=self.project, name=self.run_dir.name, id=run_id,
                              resume="allow", dir=str(self.run_dir), mode=mode,
                              config=flatten(cfg.to_dict()))

    def scalars(self, step, values: dict):
        self.run.log(dict(values), step=int(step))

    def text(self, step, tag, text):
        self.run.log({tag: text}, step=int(step))

    def flush(self):
        pass

    def finish(self, summary, files):
        if summary:
            self.run.summary.update({k: v for k, v in summary.items()
                                     if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=0 if summary else 1)


def build_sinks(cfg, run_dir: Path) -> list:
    sinks = [TensorBoardSink(Path(run_dir) / "logs")]
    if cfg.track.mlflow:
        sinks.append(MlflowSink(run_dir, cfg.track.mlflow_uri, cfg.track.experiment or cfg.name))
    if cfg.track.wandb:
        sinks.append(WandbSink(run_dir, cfg.track.experiment or cfg.name))
    return sinks
