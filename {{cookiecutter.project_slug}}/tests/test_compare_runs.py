"""compare_runs: the Pareto frontier, the report, and errors that name the file."""

import json

import pytest
from matplotlib.image import imread

from {{ cookiecutter.package_name }}.compare_runs import compare, main, pareto_frontier


def test_frontier_keeps_only_undominated_points():
    points = [(1.0, 0.5), (2.0, 0.9), (2.5, 0.8), (0.5, 0.1), (1.5, 0.5), (3.0, 0.9)]
    # (2.5, 0.8) is dominated by (2.0, 0.9); (1.5, 0.5) by (1.0, 0.5); (3.0, 0.9) by (2.0, 0.9).
    assert pareto_frontier(points) == {0, 1, 3}


def test_ties_are_all_on_the_frontier_and_single_points_too():
    assert pareto_frontier([(1.0, 1.0), (1.0, 1.0), (2.0, 0.5)]) == {0, 1}
    assert pareto_frontier([(1.0, 1.0)]) == {0}
    assert pareto_frontier([]) == set()


def write_run(folder, kl, reward, gradient, beta=0.05):
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(
        "epoch,step,train/loss,val/kl/rb/mean,val/reward/mean\n"
        f"0,9,1.0,{kl / 2},{reward / 2}\n0,10,0.5,,\n1,19,,{kl},{reward}\n"
    )
    (folder / "hparams.yaml").write_text(
        f"objective:\n  kl_gradient: {gradient}\n  beta: {beta}\n"
    )  # as RBKLModule writes it
    return folder


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
