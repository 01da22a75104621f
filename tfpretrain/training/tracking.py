"""Where metrics go: TensorBoard always; MLflow and Weights & Biases when asked (`track.*`).

Each sink gets the same calls from :class:`~tfpretrain.training.callbacks.StepLogger`:
``start(cfg)``, ``rows(steps, tags, values)`` for every step's train scalars (several steps
at once), ``scalars(step, {tag: value})``, ``text(step, tag, text)`` at evaluations,
``finish(summary, files)`` at the end. A resumed run continues its MLflow
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


class Sink:
    """What every sink shares: ``rows`` as one ``scalars`` call per step."""

    def rows(self, steps, tags, values):
        """The same tags for several steps: steps [n], tags [k], values [n, k]."""
        for step, row in zip(steps, values):
            self.scalars(int(step), {tag: float(v) for tag, v in zip(tags, row)})


class TensorBoardSink(Sink):
    def __init__(self, log_dir: Path):
        import tensorflow as tf

        self._tf = tf
        self.train = tf.summary.create_file_writer(str(Path(log_dir) / "train"))
        self.val = tf.summary.create_file_writer(str(Path(log_dir) / "val"))
        self._row_functions = {}  # tags -> the tf.function writing them

    def _writer(self, tag):
        """(the val or train writer, the name under it) of a ``split/name`` tag."""
        split, name = tag.split("/", 1)
        return (self.val if split == "val" else self.train), name

    def rows(self, steps, tags, values):
        """One graph call for all of them: written from Python, each scalar is an eager op
        (2.4 ms a step for the train scalars, 6% of a char-recipe step on 2 cores)."""
        import numpy as np

        tags = tuple(tags)
        if tags not in self._row_functions:
            self._row_functions[tags] = self._rows_function(tags)
        self._row_functions[tags](np.asarray(steps, np.int64), np.asarray(values, np.float32))

    def _rows_function(self, tags):
        """Tags of one split (the first tag's writer takes them all)."""
        tf = self._tf
        writer = self._writer(tags[0])[0]
        names = [self._writer(tag)[1] for tag in tags]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec([None, len(tags)], tf.float32)])
        def write(steps, values):
            with writer.as_default():
                for i in tf.range(tf.shape(steps)[0]):
                    with tf.name_scope(""):  # the tags as given, not "while/<tag>"
                        for j, name in enumerate(names):
                            tf.summary.scalar(name, values[i, j], step=steps[i])
        return write

    def start(self, cfg):
        pass

    def scalars(self, step, values: dict):
        for tag, value in values.items():
            writer, name = self._writer(tag)
            with writer.as_default():
                self._tf.summary.scalar(name, value, step=step)

    def text(self, step, tag, text):
        writer, name = self._writer(tag)
        with writer.as_default():
            self._tf.summary.text(name, text, step=step)

    def flush(self):
        self.train.flush()
        self.val.flush()

    def finish(self, summary, files):
        self.flush()


def mlflow_uri(uri: str | None) -> str:
    """``track.mlflow_uri``; unset = a SQLite database in the current folder (MLflow's
    recommended local store). Checks that what the URI needs is installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("track.mlflow needs MLflow: pip install 'tfpretrain[mlflow]'") \
            from None
    uri = uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise UserError(f"track.mlflow_uri {uri}: a database store needs SQLAlchemy and "
                            "Alembic: pip install 'tfpretrain[mlflow]'") from None
    elif uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps the file store behind an opt-in; it was asked for by name
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


class MlflowSink(Sink):
    """MLflow: params, per-step metrics (batched), text samples and artifacts."""

    def __init__(self, run_dir: Path, uri: str | None, experiment: str,
                 parent_run_id: str | None = None):
        self.run_dir, self.experiment = Path(run_dir), experiment
        self.uri = mlflow_uri(uri)
        self.parent_run_id = parent_run_id
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
            tags = {"tfpretrain.run_dir": str(self.run_dir)}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self.client.create_run(mlflow_experiment(self.client, self.experiment),
                                         run_name=self.run_dir.name, tags=tags)
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
            if summary.get("saved_model"):
                self.client.set_tag(self.run_id, "tfpretrain.saved_model",
                                    str(summary["saved_model"]))
        for f in files:
            if Path(f).exists():
                self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, status="FINISHED" if summary else "KILLED")


class WandbSink(Sink):
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
        sinks.append(MlflowSink(run_dir, cfg.track.mlflow_uri, cfg.track.experiment or cfg.name,
                                cfg.track.parent_run_id))
    if cfg.track.wandb:
        sinks.append(WandbSink(run_dir, cfg.track.experiment or cfg.name))
    return sinks


class SearchRun:
    """A tune search as one MLflow parent run (its trials are child runs, through
    ``track.parent_run_id``); its id lives in ``<search folder>/tracking.json``, so a
    resumed search, and every worker of a distributed one, uses the same parent."""

    def __init__(self, cfg, run_dir: Path):
        self.enabled = bool(cfg.track.mlflow)
        self.cfg, self.run_dir, self.ids = cfg, Path(run_dir), _Ids(run_dir)

    def start(self) -> str | None:
        """The chief (or a one-process search): create the parent run once."""
        if not self.enabled:
            return None
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_id = self.ids.get("mlflow_search_run_id")
        client = MlflowClient(mlflow_uri(self.cfg.track.mlflow_uri))
        if run_id is None:
            t = self.cfg.tune
            run = client.create_run(
                mlflow_experiment(client, self.cfg.track.experiment or self.cfg.name),
                run_name=f"search {self.run_dir.name}",
                tags={"tfpretrain.run_dir": str(self.run_dir), "tfpretrain.kind": "search"})
            run_id = run.info.run_id
            self.ids.set("mlflow_search_run_id", run_id)
            params = {"tune.tuner": t.tuner, "tune.max_trials": t.max_trials,
                      "tune.steps_per_trial": t.steps_per_trial, "tune.objective": t.objective,
                      **{f"space.{k}": json.dumps(v)[:500] for k, v in t.space.items()}}
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    def parent_id(self) -> str | None:
        """A worker: the chief's parent run (written before the chief serves trials)."""
        return self.ids.get("mlflow_search_run_id") if self.enabled else None

    def finish(self, result: dict, files) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        run_id = self.ids.get("mlflow_search_run_id")
        client = MlflowClient(mlflow_uri(self.cfg.track.mlflow_uri))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric(f"best/{k}" if k == self.cfg.tune.objective else k, float(v), now, 0)
            for k, v in result.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and v == v])
        for f in files:
            if Path(f).exists():
                client.log_artifact(run_id, str(f))
        client.set_terminated(run_id, status="FINISHED")
