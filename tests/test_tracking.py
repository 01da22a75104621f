import json

import pytest

from conftest import last_json_line, run_cli, tiny_raw, write_yaml


def test_mlflow_gets_params_per_step_metrics_and_artifacts(tmp_path):
    """track.mlflow with no URI: MLflow's recommended local store, a SQLite database
    (./mlflow.db of the folder fit runs in), read back through MlflowClient."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    raw = tiny_raw(tmp_path, train={"steps": 20}, eval={"every": 10},
                   export={"enabled": False})
    raw["track"] = {"mlflow": True, "experiment": "tiny-exp"}
    run_dir = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "t.yaml", raw)),
                "--run-dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = last_json_line(r.stdout)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "mlruns" / "0").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
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


@pytest.mark.slow  # suite time; run with -m slow
def test_fit_logs_to_a_real_mlflow_tracking_server_over_http(tmp_path):
    """`mlflow server` with a SQLite backend on 127.0.0.1 (the full mlflow package, in the
    test extra): a fit's params, per-step metrics and artifacts arrive over HTTP and read
    back through MlflowClient."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient
    from test_distributed import free_ports

    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port",
         uri.rsplit(":", 1)[1], "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        raw = tiny_raw(tmp_path, train={"steps": 10}, eval={"every": 10},
                       export={"enabled": False})
        raw["track"] = {"mlflow": True, "mlflow_uri": uri, "experiment": "served"}
        run_dir = tmp_path / "run"
        r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "t.yaml", raw)),
                    "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr[-3000:]
        run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "10"
        losses = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, 11))
        assert run.data.metrics["final/val_loss"] == pytest.approx(
            last_json_line(r.stdout)["val_loss"])
        assert "summary.json" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        server.terminate()
        server.wait(timeout=30)
