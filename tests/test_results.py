"""results.json bookkeeping and the README table regenerated from run summaries."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from pFedHN.results import END, START, main, summarize
from tests.conftest import REPO

FIXTURE_RUNS = REPO / "tests" / "fixtures" / "runs"


def test_summary_picks_test_accuracy_at_best_val_not_best_test():
    evaluations = [
        {"round": 0, "val_acc": 0.1, "test_acc": 0.1},
        {"round": 30, "val_acc": 0.8, "test_acc": 0.7},
        {"round": 60, "val_acc": 0.7, "test_acc": 0.9},
    ]
    assert summarize(evaluations) == {
        "test_acc_at_best_val": 0.7, "best_round": 30, "final_test_acc": 0.9}


@pytest.fixture
def workspace(tmp_path):
    static = tmp_path / "_static"
    shutil.copytree(FIXTURE_RUNS, static / "runs")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{START}\nold table\n{END}\n\n## After\n")
    return readme, static


def test_table_is_regenerated_from_the_summaries_and_is_stable(workspace):
    readme, static = workspace
    main(["--readme", str(readme), "--static", str(static)])
    text = readme.read_text()
    results = json.loads((static / "runs" / "tiny_mnist_pfedhn" / "results.json").read_text())
    assert "old table" not in text
    assert text.startswith("# Title") and text.rstrip().endswith("## After")
    row = next(line for line in text.splitlines() if "tiny_mnist_pfedhn" in line)
    assert f"{100 * results['test_acc_at_best_val']:.2f}" in row
    assert f"{100 * results['final_test_acc']:.2f}" in row
    assert "| MNIST | 5 | pFedHN | 20 |" in row
    assert "CIFAR-100" in text and "not run here" in text  # the paper's rows left to run
    plot = static / "accuracy_mnist.png"
    first = (text, plot.read_bytes())
    main(["--readme", str(readme), "--static", str(static)])
    assert (readme.read_text(), plot.read_bytes()) == first  # running twice changes nothing


def test_collect_copies_a_summary_without_machine_paths(tmp_path, workspace):
    readme, static = workspace
    run_dir = static / "runs" / "tiny_mnist_pfedhn"
    config = OmegaConf.load(run_dir / "config.yaml")
    config.resume = f"{tmp_path}/runs/r1"  # a resumed run names its directory
    OmegaConf.save(config, run_dir / "config.yaml")
    main(["--readme", str(readme), "--static", str(static), "--collect", str(run_dir), "copy"])
    copied = (static / "runs" / "copy" / "config.yaml").read_text()
    assert "root: tiny_mnist\n" in copied and "resume: r1\n" in copied
    assert str(tmp_path) not in copied
    assert sum("tiny_mnist_pfedhn" in line or "`_static/runs/copy`" in line
               for line in readme.read_text().splitlines()) == 2


def test_missing_markers_are_refused(tmp_path, workspace):
    readme, static = workspace
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        main(["--readme", str(readme), "--static", str(static)])
