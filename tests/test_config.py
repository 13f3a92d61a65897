"""Config: defaults, YAML, dotted overrides, and errors that name the key."""

import pytest

from rayprune.cli import build_parser, parse_config
from rayprune.config import ConfigError, JobConfig, flat_fields, from_dict, load_config, to_dict


def test_defaults_round_trip_through_dict():
    config = JobConfig()
    assert from_dict(JobConfig, to_dict(config)) == config


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 20\n  lr: 0.05\nattack:\n  eps: 8/255\nselection:\n  keep_fraction: 0.3\n")
    config = load_config(path, {"train.epochs": "25", "pool.prunable_sources": "synthetic,real"})
    assert config.train.epochs == 25  # CLI beats YAML
    assert config.train.lr == 0.05  # YAML beats default
    assert config.attack.eps == pytest.approx(8 / 255)
    assert config.selection.keep_fraction == 0.3
    assert config.pool.prunable_sources == ("synthetic", "real")
    assert config.model == JobConfig().model  # untouched sections keep defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.epoch": "3"}, r"unknown config key\(s\) train\.epoch; allowed in train: .*epochs"),
        ({"trian.epochs": "3"}, r"unknown config key\(s\) trian"),
        ({"train.epochs": "three"}, r"train\.epochs must be an integer"),
        ({"train.epochs": "2.5"}, r"train\.epochs must be an integer"),
        ({"train.augment": "maybe"}, r"train\.augment must be true or false"),
        ({"model.name": "resnet9000"}, r"model\.name must be one of small_cnn, .*; got 'resnet9000'"),
        ({"attack.norm": "l1"}, r"attack\.norm must be one of linf, l2; got 'l1'"),
        ({"selection.keep_fraction": "0"}, r"selection\.keep_fraction must be a number in \(0, 1\]"),
        ({"selection.keep_fraction": "1.5"}, r"selection\.keep_fraction must be a number in \(0, 1\]"),
        ({"split.subset_fraction": "-1"}, r"split\.subset_fraction must be a number in \(0, 1\]"),
        ({"extrapolation.k": "0"}, r"extrapolation\.k must be an integer in \[1, 100000\]"),
        ({"extrapolation.weighting": "far"}, r"extrapolation\.weighting must be one of"),
        ({"scoring.score": "vibes"}, r"scoring\.score must be one of .*; got 'vibes'"),
        ({"train.epochs": "10"}, r"scoring\.window \(10\) must be smaller than train\.epochs \(10\)"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(section)


def test_every_option_is_a_flag_with_its_default_in_help():
    help_text = build_parser().format_help()
    for key in flat_fields(JobConfig):
        assert f"--{key}" in help_text
    assert "(default: 0.5; a number in (0, 1])" in help_text  # selection.keep_fraction


def test_cli_overrides_and_rejects_typos(capsys):
    config, _ = parse_config(["--train.epochs", "12", "--output-dir", "/tmp/x"])
    assert config.train.epochs == 12 and config.output_dir == "/tmp/x"
    with pytest.raises(SystemExit) as exc:
        parse_config(["--train.epochz", "12"])
    assert exc.value.code == 2
    assert "--train.epochz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--extrapolation.k", "-3"])
    assert "extrapolation.k must be an integer in [1, 100000]" in capsys.readouterr().err


def test_presets_load_and_demo_preset_is_the_default():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = load_config(configs / "demo.yaml")
    assert demo == JobConfig()
    linf, l2 = load_config(configs / "cifar10-linf.yaml"), load_config(configs / "cifar10-l2.yaml")
    assert (linf.model.name, linf.train.loss, linf.train.trades_beta, linf.train.batch_size) == (
        "wrn_28_10", "trades", 5.0, 512)
    assert linf.attack.eps == pytest.approx(8 / 255) and linf.attack.steps == 10
    assert (l2.attack.norm, l2.attack.eps) == ("l2", pytest.approx(128 / 255))


def test_config_and_row_copying_stages_do_not_import_torch():
    """Ray Data actors that only copy rows (split, select) import these modules; torch
    would add seconds to every such actor's start-up."""
    import subprocess
    import sys

    code = "import sys, rayprune.config, rayprune.stages.prepare; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_preflight_refuses_bad_input_before_torch_ray_or_mlflow_load():
    """The job script checks its input before the heavy imports, so an error comes in a
    second, not after the four it takes to load them."""
    import subprocess
    import sys

    code = ("import sys, rayprune.pipeline, rayprune.preflight; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'faiss', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_option_names_match_what_the_code_implements():
    from rayprune import choices
    from rayprune.robust.models import MODEL_REGISTRY

    assert choices.MODEL_NAMES == tuple(MODEL_REGISTRY)
