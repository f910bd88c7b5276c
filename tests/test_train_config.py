"""Config files and overrides: every key and type is checked before any work, naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from rci_fast.config import ConfigError, SFTConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    smoke = load_config(ROOT / "configs/smoke.yaml")
    assert smoke.model.path is None and smoke.model.tiny.hidden_size == 64
    big = load_config(ROOT / "configs/qwen2.5-7b-sft.yaml")
    assert (big.train.epochs, big.train.batch_size, big.data.min_score) == (3, 32, 1.0)
    assert big.train.lr == pytest.approx(1e-5) and big.train.mixed_precision == "bf16"


def test_overrides_set_nested_keys_with_yaml_values(tmp_path):
    path = write(tmp_path, "data: {train_file: a.jsonl}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["train.lr=2e-5", "train.epochs=7", "model.path=null", "train.betas=[0.8, 0.9]",
                             "model.tiny.tie_word_embeddings=false", "out_dir=runs/x"])
    assert cfg.train.lr == pytest.approx(2e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.model.path is None and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.tiny.tie_word_embeddings is False and cfg.out_dir == "runs/x"
    assert cfg.train.batch_size == SFTConfig().train.batch_size  # untouched keys keep their defaults


def test_yaml_1e5_spelling_and_int_for_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as a string; a float field accepts it, and ints widen.
    cfg = load_config(write(tmp_path, "data: {train_file: a}\ntrain: {lr: 1e-5, grad_clip: 2}\n"))
    assert cfg.train.lr == pytest.approx(1e-5) and cfg.train.grad_clip == 2.0


@pytest.mark.parametrize("text, overrides, key", [
    ("data: {train_file: a}\ntrain: {lrr: 1.0}\n", [], "train.lrr"),
    ("data: {train_file: a}\nbogus: 1\n", [], "bogus"),
    ("data: {train_file: a}\n", ["model.tiny.hidden=3"], "model.tiny.hidden"),
    ("data: {train_file: a}\n", ["checkpoint.evry=3"], "checkpoint.evry"),
])
def test_unknown_keys_are_named(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(write(tmp_path, text), overrides)
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize("overrides, key, expected", [
    (["train.lr=fast"], "train.lr", "float"),
    (["train.epochs=2.5"], "train.epochs", "int"),
    (["train.epochs=true"], "train.epochs", "int"),        # a bool is not an int
    (["model.path=3"], "model.path", "str"),
    (["train.betas=0.9"], "train.betas", "a list"),
    (["train.betas=[0.9, x]"], "train.betas[1]", "float"),
    (["model.tiny=5"], "model.tiny", "a mapping"),
    (["data.check_chat_template=yes please"], "data.check_chat_template", "bool"),
])
def test_wrong_types_are_named(tmp_path, overrides, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data: {train_file: a}\n"), overrides)
    assert str(err.value).startswith(f"{key}: expected {expected}")


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"), ("train.schedule=linear", "train.schedule"),
    ("train.lr=0", "train.lr"), ("data.train_file=", "data.train_file"),
    ("train.mixed_precision=fp8", "train.mixed_precision"), ("train.micro_batch_tokens=-1", "train.micro_batch_tokens"),
    ("model.tiny.num_key_value_heads=3", "model.tiny.num_key_value_heads"),
    ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers"),
])
def test_bad_values_are_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, "data: {train_file: a}\n"), [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(write(tmp_path, "out_dir: a\ndata: {train_file: a}\n"), ["out_dir.x=1"])
    with pytest.raises(ConfigError, match="out_dir: expected str"):  # a section where a value belongs
        load_config(write(tmp_path, "data: {train_file: a}\n"), ["out_dir.x=1"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def rci(*args):
    return subprocess.run([sys.executable, "-m", "rci_fast", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    r = rci("sft", "--config", "configs/smoke.yaml", f"out_dir={tmp_path}/run", "train.lrr=1")
    assert r.returncode == 2 and "train.lrr" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
    r = rci("sft", "--config", "configs/smoke.yaml", "--set", "train.epochs=two")
    assert r.returncode == 2 and "train.epochs: expected int" in r.stderr
    r = rci("sft", "--config", "configs/smoke.yaml", f"data.train_file={tmp_path}/missing.jsonl")
    assert r.returncode == 2 and f"{tmp_path}/missing.jsonl" in r.stderr
    r = rci("sft", "--config", "configs/smoke.yaml", "--print-config", "train.lr=0.5")
    assert r.returncode == 0 and "lr: 0.5" in r.stdout
    r = rci("sft", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "torchrun" in r.stdout


def test_yaml_errors_name_the_file_line_or_override(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data: {train_file: a}\ntrain:\n  lr: 1\n   x: 2\n"))
    assert str(err.value).startswith(f"{tmp_path / 'c.yaml'}:4: not valid YAML (")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data: {train_file: a}\n"), ["train.betas=[0.9"])
    assert str(err.value).startswith("override train.betas: '[0.9' is not a valid YAML value (")
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(write(tmp_path, "data: {train_file: a}\n"), ["train.lr=.inf"])
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(write(tmp_path, "data: {train_file: a}\n"), ["train.lr=.nan"])


def test_an_integer_past_float_range_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(write(tmp_path, "data: {train_file: a}\n"), ["train.lr=1" + "0" * 400])
