import json

import pytest

from conftest import last_json_line, run_cli, tiny_raw, write_yaml


def test_mlflow_gets_params_per_step_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    raw = tiny_raw(tmp_path, train={"steps": 20}, eval={"every": 10},
                   export={"enabled": False})
    raw["track"] = {"mlflow": True, "mlflow_uri": store, "experiment": "tiny-exp"}
    run_dir = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "t.yaml", raw)),
                "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = last_json_line(r.stdout)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    import os
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-exp"
    assert run.data.params["model.num_layers"] == "2"
    assert run.data.params["train.steps"] == "20"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [10, 20]
    assert run.data.metrics["final/val_loss"] == pytest.approx(summary["val_loss"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "val_sample_00000020.txt"} <= artifacts


def test_wandb_offline_run_is_written(tmp_path):
    pytest.importorskip("wandb")
    raw = tiny_raw(tmp_path, train={"steps": 10}, eval={"every": 10},
                   export={"enabled": False})
    raw["track"] = {"wandb": True}
    run_dir = tmp_path / "run"
    env_key = __import__("os").environ.pop("WANDB_API_KEY", None)
    try:
        r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "w.yaml", raw)),
                    "--run-dir", str(run_dir))
    finally:
        if env_key:
            __import__("os").environ["WANDB_API_KEY"] = env_key
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))
