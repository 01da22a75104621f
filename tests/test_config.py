import pytest

from conftest import REPO, run_cli, tiny_raw, write_yaml
from tfpretrain.errors import UserError
from tfpretrain.config import (ConfigError, all_keys, build_config, load_config,
                               parse_overrides)


def problems_of(raw):
    with pytest.raises(ConfigError) as exc:
        build_config(raw)
    return exc.value.problems, str(exc.value)


def test_defaults_are_valid_and_configs_have_one_copy():
    from tfpretrain.config import PACKAGE_CONFIGS, packaged_configs

    cfg = load_config()
    assert cfg.name == "default" and cfg.model.arch == "gpt2"
    assert cfg.tokenizer.kind == "sentencepiece_bpe" and cfg.data.path is None
    assert not (REPO / "tfpretrain" / "configs").exists()   # one copy in git: configs/
    assert PACKAGE_CONFIGS.resolve() == (REPO / "configs").resolve()
    assert packaged_configs() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_config_by_name_and_unknown_name():
    assert load_config("char-cpu").tokenizer.kind == load_config(
        str(REPO / "configs" / "char-cpu.yaml")).tokenizer.kind
    assert load_config("char-cpu").name == "char-cpu"
    with pytest.raises(UserError, match="neither a file nor a packaged config. Packaged "
                                        "configs: bert-mini-mlm, char-cpu, default"):
        load_config("char-gpu")
    with pytest.raises(UserError, match="no such file"):
        load_config("missing/char-cpu.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_builds(name):
    from tfpretrain.data.tokenizers import BYTE_VOCABULARY_SIZE
    from tfpretrain.objectives import build_model

    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    vocab = BYTE_VOCABULARY_SIZE if cfg.tokenizer.kind == "byte" else \
        min(cfg.tokenizer.vocabulary_size, 300)
    model = build_model(cfg, vocab)
    assert model.backbone.count_params() > 0


def test_unknown_key_suggests_the_right_one():
    problems, msg = problems_of({"optimizer": {"learning_rat": 0.1}})
    assert problems == ["unknown key `optimizer.learning_rat`. Did you mean "
                        "`optimizer.learning_rate`?"]
    problems, _ = problems_of({"trian": {"steps": 3}})
    assert "unknown section `trian`" in problems[0] and "`train" in problems[0]


def test_all_problems_reported_at_once_with_received_values():
    problems, msg = problems_of({
        "model": {"arch": "gpt3", "num_layers": "four", "dropout": 1.5},
        "train": {"steps": 0},
        "tokenizer": {"kind": "bytes"},
    })
    assert len(problems) == 5, problems
    assert any("`model.arch` must be one of gpt2, llama, bert. Received: 'gpt3'" in p
               for p in problems)
    assert any("`model.num_layers` must be an integer. Received: 'four'" in p for p in problems)
    assert any("`model.dropout` must be <= 1.0. Received: 1.5" in p for p in problems)
    assert any("`train.steps` must be >= 1. Received: 0" in p for p in problems)
    assert "5 problems" in msg


def test_cross_field_checks():
    problems, _ = problems_of({"optimizer": {"warmup_steps": 5000}, "train": {"steps": 2000},
                               "model": {"hidden_dim": 130, "num_heads": 4}})
    assert any("`optimizer.warmup_steps` must be < `train.steps`. Received: "
               "warmup_steps=5000, steps=2000" in p for p in problems)
    assert any("hidden_dim" in p and "divisible" in p for p in problems)


def test_overrides_parse_yaml_scalars_including_exponent_floats(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path))
    cfg = load_config(str(path), ["optimizer.learning_rate=1e-3", "train.steps=7",
                                  "model.arch=llama", "data.path=[a.txt, b.txt]",
                                  "optimizer.warmup_steps=0"])
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert cfg.train.steps == 7 and cfg.model.arch == "llama"
    assert cfg.data.path == ["a.txt", "b.txt"]
    assert cfg.name == "c"
    assert parse_overrides(["eval.prompt=Hello there"]) == {"eval": {"prompt": "Hello there"}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.steps"])


def test_every_key_is_documented_in_the_config_reference():
    from tfpretrain.config import markdown_reference

    reference = (REPO / "docs" / "config.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in reference]
    assert not missing, f"undocumented config keys: {missing}"
    assert markdown_reference() in reference, "regenerate with: python -m tfpretrain.config"


def test_cli_config_errors_exit_2_without_traceback(tmp_path):
    r = run_cli("tfpretrain.fit", "--set", "optimizer.learnig_rate=0.1", "--set",
                "train.batch_size=-1", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "Did you mean `optimizer.learning_rate`?" in r.stderr
    assert "`train.batch_size` must be >= 1. Received: -1" in r.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_config_params_and_tokens(tmp_path):
    r = run_cli("tfpretrain.fit", "--dry-run", "--set", "train.steps=10",
                "--set", "optimizer.warmup_steps=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokenizer:" in r.stdout and "kind: sentencepiece_bpe" in r.stdout
    info = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert info["tokens_per_step"] == 32 * 128
    assert info["planned_tokens"] == 10 * 32 * 128
    assert 500_000 < info["params"] < 2_000_000
    assert not (tmp_path / "runs").exists()


def test_rerun_exit_code_cannot_take_another_outcomes_code():
    """train.rerun_exit_code must not read as a guard stop (3) or a full disk (74), nor be
    outside what a process can exit with."""
    for code, what in ((74, "a refused write (disk full)"), (3, "a stop of the stability guard")):
        problems, _ = problems_of({"train": {"rerun_exit_code": code}})
        assert problems == [f"`train.rerun_exit_code` {code} is tfpretrain's exit code for "
                            f"{what}; choose another (75, or 138 under Kubeflow's "
                            "restartPolicy: ExitCode)"]
    problems, _ = problems_of({"train": {"rerun_exit_code": 256}})
    assert "train.rerun_exit_code" in problems[0]
    assert build_config({"train": {"rerun_exit_code": 138}}).train.rerun_exit_code == 138


def test_eval_sets_names_and_the_tune_objectives_they_add():
    sets = {"eval": {"sets": {"old_web": "old.txt", "code": ["a.txt", "b.txt"]}}}
    cfg = build_config({**sets, "tune": {"objective": "val_old_web_loss"}})
    assert cfg.eval.sets["code"] == ["a.txt", "b.txt"]
    build_config({**sets, "tune": {"objective": "val_code_bits_per_byte"}})
    with pytest.raises(ConfigError, match="val_loss, val_bits_per_byte.*Received: 'val_x_loss'"):
        build_config({"tune": {"objective": "val_x_loss"}})
    for bad in ({"a/b": "x.txt"}, {"two__under": "x.txt"}, {"ok": ""}, {"ok": [1]}, {}):
        with pytest.raises(ConfigError, match="`eval.sets` must map names"):
            build_config({"eval": {"sets": bad}})
