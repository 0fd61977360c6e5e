"""compare_runs: the Pareto frontier, the report, the plot, a warning for mixed rewards, and
errors that name the file."""

import json
import random

import pytest
from conftest import drawn_clashes, frontier_line, non_dominated
from matplotlib.image import imread

from {{ cookiecutter.package_name }}.reports import plots
from {{ cookiecutter.package_name }}.reports.compare_runs import compare, main, pareto_frontier


def test_frontier_keeps_only_undominated_points():
    points = [(1.0, 0.5), (2.0, 0.9), (2.5, 0.8), (0.5, 0.1), (1.5, 0.5), (3.0, 0.9)]
    # (2.5, 0.8) is dominated by (2.0, 0.9); (1.5, 0.5) by (1.0, 0.5); (3.0, 0.9) by (2.0, 0.9).
    assert pareto_frontier(points) == {0, 1, 3}


def test_ties_are_all_on_the_frontier_and_single_points_too():
    assert pareto_frontier([(1.0, 1.0), (1.0, 1.0), (2.0, 0.5)]) == {0, 1}
    assert pareto_frontier([(1.0, 1.0)]) == {0}
    assert pareto_frontier([]) == set()


def write_run(folder, kl, reward, gradient, beta=0.05, reward_config=None, config_name="config.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.csv").write_text(
        "epoch,step,train/loss,val/kl/rb/mean,val/reward/mean\n"
        f"0,9,1.0,{kl / 2},{reward / 2}\n0,10,0.5,,\n1,19,,{kl},{reward}\n"
    )
    (folder / "hparams.yaml").write_text(
        f"objective:\n  kl_gradient: {gradient}\n  beta: {beta}\n"
    )  # as RBKLModule writes it
    if reward_config is not None:  # as LightningCLI saves it (the reward is not in hparams.yaml)
        config = {
            "model": {"class_path": "{{ cookiecutter.package_name }}.training.module.RBKLModule", "init_args": {"reward": reward_config}}
        }
        (folder / config_name).write_text(json.dumps(config))
    return folder


VADER = {"class_path": "{{ cookiecutter.package_name }}.training.rewards.VaderSentimentReward", "init_args": {"include_prompt": True}}
KEYWORD = {"class_path": "{{ cookiecutter.package_name }}.training.rewards.KeywordReward", "init_args": {"words": ["good"], "scale": 1.0}}


def test_compare_reports_frontier_shares_and_draws(tmp_path):
    runs = [
        write_run(tmp_path / "a", 1.0, 0.8, "rb"),
        write_run(tmp_path / "b", 2.0, 0.9, "rb"),
        write_run(tmp_path / "c", 1.5, 0.7, "mc"),  # dominated by a
        write_run(tmp_path / "d", 0.5, 0.3, "mc"),
    ]
    summary = compare(runs, tmp_path / "out")
    assert [r["on_frontier"] for r in summary["runs"]] == [True, True, False, True]
    assert summary["frontier_share"] == pytest.approx({"mc": 1 / 3, "rb": 2 / 3})
    assert summary["runs"][0]["kl"] == 1.0  # the last validation row, not an earlier one
    assert json.loads((tmp_path / "out" / "pareto.json").read_text())["frontier_share"]["rb"] == pytest.approx(2 / 3)
    assert imread(tmp_path / "out" / "pareto.png").shape == (480, 640, 4)


def test_missing_and_corrupt_files_name_the_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.csv"):
        compare([tmp_path / "nowhere"], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("epoch,step,train/loss\n0,1,0.3\n")
    with pytest.raises(ValueError, match=r"bad/metrics.csv: unreadable metrics \(no row has both"):
        compare([bad], tmp_path / "out")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metrics.csv").write_text("val/kl/rb/mean,val/reward/mean\nabc,def\n")
    with pytest.raises(ValueError, match="garbage/metrics.csv"):
        compare([garbage], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "bad/metrics.csv" in capsys.readouterr().err


def test_incomplete_runs_are_skipped_with_a_line_each_unless_strict(tmp_path, capsys):
    good = write_run(tmp_path / "good", 1.0, 0.8, "rb")
    empty = tmp_path / "empty"  # interrupted before it wrote anything
    empty.mkdir()
    no_validation = tmp_path / "no_val"
    no_validation.mkdir()
    (no_validation / "metrics.csv").write_text("epoch,step,train/loss\n0,1,0.3\n")
    main([str(good), str(empty), str(no_validation), "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert f"skipped {empty}:" in out and f"skipped {no_validation}:" in out
    assert "skipped 2 of 3 runs" in out and "1 runs; share" in out
    assert len(json.loads((tmp_path / "out" / "pareto.json").read_text())["skipped"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(good), str(empty), "--output", str(tmp_path / "out"), "--strict"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([str(empty), "--output", str(tmp_path / "out")])  # nothing left to compare


def test_runs_with_different_rewards_get_one_warning_line_naming_them(tmp_path, capsys):
    same = [write_run(tmp_path / f"same{i}", 1.0 + i, 0.5, "rb", reward_config=VADER) for i in range(2)]
    main([*map(str, same), "--output", str(tmp_path / "out")])
    assert "warning" not in capsys.readouterr().err, "equal rewards: no warning"

    mixed = [*same, write_run(tmp_path / "keyword", 1.5, 2.0, "mc", reward_config=KEYWORD)]
    main([*map(str, mixed), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the runs were trained with different rewards"), err
    assert "VaderSentimentReward(include_prompt=True) (2 runs)" in err[0]
    assert "KeywordReward(words=['good'], scale=1.0) (1 run)" in err[0]

    # The newest config of a resumed run is the one that counts; runs without a config say nothing.
    write_run(tmp_path / "keyword", 1.5, 2.0, "mc", reward_config=VADER, config_name="config.resumed-at-step-40.yaml")
    unknown = write_run(tmp_path / "unknown", 2.5, 0.1, "mc")
    main([*map(str, mixed), str(unknown), "--output", str(tmp_path / "out")])
    assert "warning" not in capsys.readouterr().err
    none = write_run(tmp_path / "none", 0.5, 0.0, "rb", reward_config=None)
    (none / "config.yaml").write_text(json.dumps({"model": {"init_args": {"reward": None}}}))
    assert "none (1 run)" in compare([*same, none], tmp_path / "out")["warnings"][0]


@pytest.mark.parametrize("count", [1, 4, 12, 30])
def test_the_pareto_plot_draws_exactly_the_non_dominated_runs_with_clear_labels(count, tmp_path):
    rng = random.Random(count)
    points = []
    for i in range(count):
        kl = round(rng.uniform(0.1, 2.0), 1)  # rounded: ties in KL happen
        gradient = ("rb", "mc")[i % 2]
        points.append({"kl": kl, "reward": round(kl / 2 + rng.uniform(0, 0.3), 2), "kl_gradient": gradient})
        points[-1]["beta"] = (0.02, 0.05, 0.1)[i % 3]
    xy = [(p["kl"], p["reward"]) for p in points]
    fig = plots.pareto(points, pareto_frontier(xy))
    fig.savefig(tmp_path / f"pareto_{count}.png")
    assert frontier_line(fig) == {xy[i] for i in non_dominated(xy)}
    assert drawn_clashes(fig) == []
    assert fig.axes[0].texts, "points are labelled where there is room"


def test_a_run_whose_objective_changed_is_labelled_mixed_and_warned_about(tmp_path):
    same = write_run(tmp_path / "same", 1.0, 0.8, "rb")
    mixed = write_run(tmp_path / "mixed", 2.0, 0.9, "rb", beta=0.5)
    # Resumed at step 3 with beta 0.5, then at step 8 with the sampling changed as well.
    (mixed / "objective_changes.yaml").write_text(
        "- from_step: 3\n  changes:\n    objective.beta: {before: 0.05, after: 0.5}\n"
        "- from_step: 8\n  changes:\n    sampling.samples_per_prompt: {before: 4, after: 8}\n"
    )
    summary = compare([same, mixed], tmp_path / "out")
    assert [run["label"] for run in summary["runs"]] == ["beta=0.05", "beta=0.05->0.5, samples_per_prompt=4->8 (mixed)"]
    assert summary["warnings"] == [
        f"warning: {mixed} changed its objective when resumed (objective.beta 0.05 -> 0.5 at step 3; "
        "sampling.samples_per_prompt 4 -> 8 at step 8; objective_changes.yaml): its point mixes objectives, "
        "labelled 'beta=0.05->0.5, samples_per_prompt=4->8 (mixed)'"
    ]
