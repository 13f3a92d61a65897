"""The job never deletes or overwrites what it did not write, and never replaces kept
results silently. Every case compares the user's files byte for byte before and after."""

import json
import os
from pathlib import Path

import pytest
from conftest import TINY_JOB, tiny_job_flags, tree_snapshot

from rayprune import cli, rundir
from rayprune.config import ConfigError, flat_options, load_config
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.data.pool import write_demo_pool
from rayprune.errors import InputError
from rayprune.pipeline import planned_stages, prepare_output_dir
from rayprune.preflight import preflight
from rayprune.stages.common import stage_for


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (hidden ones included) with its bytes."""
    return {path: content for path, content in tree_snapshot(root).items() if isinstance(content, bytes)}


def config(out: Path, **overrides):
    return load_config(None, {**TINY_JOB, "output_dir": str(out),
                              **{k.replace("__", "."): v for k, v in overrides.items()}})


def fake_committed_run(cfg) -> None:
    """Commit every planned stage the way the stages record them, without running Ray.

    The option sections are the stages' own (a real run's records are checked against
    this in tests/test_pipeline.py)."""
    root = Path(cfg.output_dir)
    rundir.claim(root)
    sections = {
        "pool": ("pool.demo",), "split": ("split", "pool.prunable_sources"),
        "score_subset": ("model", "attack", "train"),
        "extrapolate": ("extrapolation", "scoring"), "select": ("selection", "pool.prunable_sources", "scoring.score"),
        "final_train": ("final", "model", "attack"), "test_pool": ("pool.demo", "evaluation.demo_test_size"),
        "evaluate": ("evaluation", "attack"),
    }
    upstream = {"split": {"pool": "p"}, "score_subset": {"split": "s"}, "extrapolate": {"score_subset": "c"},
                "select": {"extrapolate": "e"}, "final_train": {"select": "x"}, "evaluate": {"final_train": "f"}}
    for name in planned_stages(cfg):
        stage = stage_for(cfg, root, name, sections[name], upstream=upstream.get(name),
                          exclude=("final.enabled", "final.compare_random") if name == "final_train" else (),
                          resumable=name in ("score_subset", "final_train"))
        stage.begin()
        (stage.dir / "result.bin").write_bytes(os.urandom(64))
        stage.commit({"rows": 1})


def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("rayprune: error: "), err
    return err


# ------------------------------------------------------------------- not a rayprune run


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path, capsys, no_ray_no_mlflow):
    out = tmp_path / "mine"
    (out / "split").mkdir(parents=True)
    (out / "split" / "notes.csv").write_text("a,b\n1,2\n")
    (out / "score_subset").mkdir()
    (out / "score_subset" / "weights.pt").write_bytes(b"\x00" * 100)
    before = tree_snapshot(out)
    err = run_cli(["--output-dir", str(out), "--tracking.enabled", "false"], capsys)
    assert "is not empty and is not a rayprune run" in err and str(out) in err
    assert tree_snapshot(out) == before


def test_a_converted_pool_under_the_output_dir_is_never_replaced_by_the_demo_pool(tmp_path, capsys, no_ray_no_mlflow):
    data = tmp_path / "data"
    write_demo_pool(DemoPoolSpec(n_real=20, n_synthetic=40, image_size=8, num_classes=3), data / "pool")
    before = tree_snapshot(data)
    err = run_cli(["--output-dir", str(data), "--tracking.enabled", "false"], capsys)  # no --pool.path: the demo
    assert "not a rayprune run" in err
    assert tree_snapshot(data) == before


def test_a_foreign_folder_named_like_a_stage_inside_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    fake_committed_run(config(out))
    foreign = out / "final_train"
    foreign.rename(tmp_path / "was_final")
    foreign.mkdir()
    (foreign / "my_model.pt").write_bytes(b"days of GPU time")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"final_train was not written by rayprune \(no _STARTED.json\)"):
        preflight(config(out))
    with pytest.raises(InputError, match="was not written by rayprune"):  # the stage's own guard, should one get past
        stage_for(config(out), out, "final_train", ("final",)).begin()
    assert snapshot(out) == before


def test_empty_and_missing_output_dirs_are_fine_and_get_the_run_marker(tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        preflight(config(out))
        prepare_output_dir(config(out))
        assert json.loads((out / rundir.RUN_MARKER).read_text())["tool"] == "rayprune"


# ------------------------------------------------------------------- overlapping the pools


@pytest.mark.parametrize("where", ["same", "inside", "above"])
@pytest.mark.parametrize("option", ["pool.path", "evaluation.test_pool"])
def test_output_dir_may_not_overlap_a_pool(tmp_path, capsys, no_ray_no_mlflow, where, option):
    pool = tmp_path / "data" / "pool"
    write_demo_pool(DemoPoolSpec(n_real=40, n_synthetic=200, image_size=8, num_classes=3), pool)
    out = {"same": pool, "inside": pool / "out", "above": tmp_path / "data"}[where]
    before = tree_snapshot(tmp_path)
    flags = ["--pool.path", str(pool)] if option == "pool.path" else [
        "--evaluation.test_pool", str(pool), "--pool.demo.num_classes", "3", "--pool.demo.image_size", "8"]
    err = run_cli(["--output-dir", str(out), *flags, "--tracking.enabled", "false"], capsys)
    assert f"and {option} {pool} overlap" in err
    assert tree_snapshot(tmp_path) == before


def test_empty_output_dir_is_an_error(capsys, no_ray_no_mlflow):
    assert "output_dir must be a directory path; got ''" in run_cli(["--output-dir", ""], capsys)


# ------------------------------------------------------------------- reruns with other inputs


def test_a_rerun_with_changed_options_stops_before_any_work_and_names_them(tmp_path, capsys, no_ray_no_mlflow):
    out = tmp_path / "run"
    fake_committed_run(config(out))
    before = snapshot(out)
    err = run_cli([*tiny_job_flags(), "--output-dir", str(out), "--split.seed", "3"], capsys)
    assert "committed results of stage split (split.seed: 0 -> 3)" in err
    assert "and of score_subset, extrapolate, select, final_train, evaluate made from them" in err
    assert "--stale_results archive" in err
    assert snapshot(out) == before


def test_only_the_stages_whose_inputs_changed_are_stale(tmp_path):
    out = tmp_path / "run"
    fake_committed_run(config(out))

    def stale(**overrides):
        changed = config(out, **overrides)
        found = rundir.find_stale_stages(out, planned_stages(changed), flat_options(changed),
                                         {"pool": "demo", "test pool": "demo"})
        return [(s.name, s.changes) for s in found]

    assert stale() == []
    # Options that do not change results: tracking, Ray sizing, the random baseline's switch.
    assert stale(tracking__experiment="other", ray__embed_threads=1, final__compare_random="false",
                 stale_results="delete") == []
    assert stale(**{"final.train.epochs": 3}) == [("final_train", ["final.train.epochs: 2 -> 3"]),
                                                    ("evaluate", [])]
    assert stale(**{"evaluation.apgd_steps": 7}) == [("evaluate", ["evaluation.apgd_steps: 5 -> 7"])]
    assert [s for s, _ in stale(**{"attack.eps": 0.01})] == ["score_subset", "extrapolate", "select", "final_train",
                                                              "evaluate"]


def test_archive_moves_exactly_the_stale_stages_aside_byte_identical(tmp_path):
    out = tmp_path / "run"
    fake_committed_run(config(out))
    before = snapshot(out)
    changed = config(out, **{"selection.keep_fraction": 0.3, "stale_results": "archive"})
    preflight(changed)  # archive: no refusal
    prepare_output_dir(changed)
    archived = sorted((out / rundir.ARCHIVE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in archived] == ["evaluate", "final_train", "select"]
    after = snapshot(out)
    for path, content in before.items():
        stage = path.split("/")[0]
        if stage in ("select", "final_train", "evaluate"):
            moved = [p for p in archived if p.name.startswith(stage + "-")][0]
            assert (moved / path.split("/", 1)[1]).read_bytes() == content
        else:
            assert after[path] == content  # untouched


def test_delete_removes_exactly_the_stale_stages(tmp_path):
    out = tmp_path / "run"
    fake_committed_run(config(out))
    (out / "notes.txt").write_text("the user's notes in the run directory stay")
    before = snapshot(out)
    prepare_output_dir(config(out, **{"evaluation.apgd_steps": 7, "stale_results": "delete"}))
    after = snapshot(out)
    assert not (out / "evaluate").exists()
    assert {k: v for k, v in before.items() if not k.startswith("evaluate/")} == after


def test_a_stage_refuses_to_replace_kept_results_it_finds_unexpectedly(tmp_path):
    """The safety net behind the preflight, e.g. for a different number of training workers."""
    out = tmp_path / "run"
    cfg = config(out)
    fake_committed_run(cfg)
    before = snapshot(out)
    moved = stage_for(cfg, out, "score_subset", ("model", "attack", "train"), upstream={"split": "s"},
                      facts={"training workers": 2}, resumable=True)
    with pytest.raises(InputError, match=r"stage score_subset: .* holds committed results made from other inputs "
                                         r"\(training workers.*\); rerun with --stale_results archive"):
        moved.begin()
    assert snapshot(out) == before
    cfg_archive = config(out, stale_results="archive")
    stage_for(cfg_archive, out, "score_subset", ("model", "attack", "train"), upstream={"split": "s"},
              facts={"training workers": 2}, resumable=True).begin()
    (archived,) = (out / rundir.ARCHIVE_DIR).iterdir()
    assert (archived / "result.bin").read_bytes() == before["score_subset/result.bin"]


def test_unfinished_stages_are_cleared_only_when_they_cannot_resume(tmp_path):
    out = tmp_path / "run"
    cfg = config(out)
    rundir.claim(out)
    split = stage_for(cfg, out, "split", ("split",))
    split.begin()
    (split.dir / "partial.bin").write_bytes(b"x")
    score = stage_for(cfg, out, "score_subset", ("train",), resumable=True)
    score.begin()
    (score.dir / "checkpoint.pt").write_bytes(b"progress")
    # A later attempt with other inputs clears the split's leftovers, but not a resumable stage's.
    stage_for(config(out, **{"split.seed": 4}), out, "split", ("split",)).begin()
    assert not (out / "split" / "partial.bin").exists()
    with pytest.raises(InputError, match="an unfinished run that could resume"):
        stage_for(config(out, **{"train.lr": 0.05}), out, "score_subset", ("train",), resumable=True).begin()
    # A failed run removes what it started and cannot resume, and keeps the checkpoints.
    assert rundir.remove_unfinished(out) == ["split"]
    assert (out / "score_subset" / "checkpoint.pt").read_bytes() == b"progress"
