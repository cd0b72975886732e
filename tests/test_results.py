"""results.json bookkeeping and the README table regenerated from run summaries."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from pFedHN.dataset import DATASETS, federated_data
from pFedHN.recorder import RunRecorder, summarize
from pFedHN.results import END, RUNS_END, RUNS_START, START, main, network_table
from pFedHN.settings import SplitSettings
from tests.conftest import REPO, TINY_MNIST

FIXTURE_RUNS = REPO / "tests" / "fixtures" / "runs"


def test_summary_picks_test_accuracy_at_best_val_not_best_test():
    evaluations = [
        {"round": 0, "val_acc": 0.1, "test_acc": 0.1},
        {"round": 30, "val_acc": 0.8, "test_acc": 0.7},
        {"round": 60, "val_acc": 0.7, "test_acc": 0.9},
    ]
    assert summarize(evaluations) == {
        "test_acc_at_best_val": 0.7, "best_round": 30, "final_test_acc": 0.9,
        "best_test_acc": 0.9, "best_test_round": 60}  # the MH-pFedHN authors' measure


@pytest.fixture
def workspace(tmp_path):
    static = tmp_path / "_static"
    shutil.copytree(FIXTURE_RUNS, static / "runs")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{START}\nold table\n{END}\n\n## After\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text(f"# Runs\n\n{RUNS_START}\nold\n{RUNS_END}\n")
    return readme, static


def test_local_steps_clipped_ones_and_round_times_are_kept_over_rounds_and_a_resume(tmp_path):
    def client(steps, clipped, largest):
        return {"steps": steps, "clipped-steps": clipped, "largest-grad-norm": largest}

    recorder = RunRecorder(tmp_path, 4, "tally")
    recorder.on_fit(1, [client(12, 0, 3.5), client(12, 2, 61.0)], {})
    recorder.on_fit(2, [client(12, 1, 55.0)], {})
    saved = recorder.state_dict()
    recorder.close()
    resumed = RunRecorder(tmp_path, 4, "tally")
    resumed.load_state_dict(saved)
    resumed.on_fit(3, [client(9, 0, 7.0)], {})
    # round 2's time, kept (round 3, the first after a resume, includes the start-up)
    assert len(resumed.round_times) == 1
    resumed.save()
    resumed.close()
    tally = json.loads((tmp_path / "results.json").read_text())["local_steps"]
    assert tally == {"steps": 45, "clipped": 3, "largest_grad_norm": 61.0, "from_round": 0}
    older = RunRecorder(tmp_path, 4, "tally")  # a checkpoint from before the tally
    older.load_state_dict({k: v for k, v in saved.items() if k != "local_steps"})
    older.on_fit(3, [client(9, 0, 7.0)], {})
    assert older.local_steps == {"steps": 9, "clipped": 0, "largest_grad_norm": 7.0,
                                 "from_round": 2}
    older.close()


def test_test_accuracy_is_pooled_per_network_size_where_sizes_differ(tmp_path):
    recorder = RunRecorder(tmp_path, 2, "networks", network_names={100: "small"})
    metrics = {"val_acc": 0.5, "test_acc": 0.5, "test_acc_min": 0.0, "test_acc_max": 1.0,
               "val_loss": 1.0}
    per_client = {0: {"test_acc": 0.5, "test_n": 10, "num_parameters": 100},
                  1: {"test_acc": 1.0, "test_n": 30, "num_parameters": 100},
                  2: {"test_acc": 0.25, "test_n": 8, "num_parameters": 2500}}
    recorder.on_evaluate(1, metrics, per_client)
    # (5 + 30) / 40 for the two small clients; the unnamed size by its count
    assert recorder.evaluations[-1]["test_acc_by_network"] == {
        "small": 35 / 40, "2,500 parameters": 0.25}
    same_size = {k: v | {"num_parameters": 100} for k, v in per_client.items()}
    recorder.on_evaluate(2, metrics, same_size)
    assert "test_acc_by_network" not in recorder.evaluations[-1]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluations"][0]["test_acc_by_network"]["small"] == 35 / 40
    # Each client's own figure too, by partition (what an exported model scores).
    assert saved["evaluations"][0]["per_client"]["2"] == {"test_acc": 0.25}


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
    assert "| MNIST | 5 | pFedHN | ours | 20 | 42 |" in row
    assert "CIFAR-100" in text and "not run here" in text  # the paper's rows left to run
    plot = static / "accuracy_mnist.png"
    first = (text, plot.read_bytes())
    main(["--readme", str(readme), "--static", str(static)])
    assert (readme.read_text(), plot.read_bytes()) == first  # running twice changes nothing


def test_seeds_of_one_setting_share_a_row_with_mean_and_std(workspace):
    readme, static = workspace
    runs = static / "runs"
    finals = {42: None, 43: 0.80, 44: 0.90}
    for seed, final in finals.items():
        if final is None:
            finals[seed] = json.loads((runs / "tiny_mnist_pfedhn" / "results.json").read_text())[
                "final_test_acc"]
            continue
        folder = runs / f"seed{seed}"
        shutil.copytree(runs / "tiny_mnist_pfedhn", folder)
        config = OmegaConf.load(folder / "config.yaml")
        config.seed = seed
        OmegaConf.save(config, folder / "config.yaml")
        results = json.loads((folder / "results.json").read_text())
        results["final_test_acc"] = final
        (folder / "results.json").write_text(json.dumps(results))
    # The same setting on the authors' split is a row of its own.
    shutil.copytree(runs / "tiny_mnist_pfedhn", runs / "authors")
    config = OmegaConf.load(runs / "authors" / "config.yaml")
    config.client.partition = "authors"
    OmegaConf.save(config, runs / "authors" / "config.yaml")
    main(["--readme", str(readme), "--static", str(static)])
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| MNIST | 5 |")]
    assert len(rows) == 2
    values = [100 * v for v in finals.values()]
    mean = sum(values) / 3
    std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # sample std over seeds
    assert "| ours | 20 | 42, 43, 44 |" in rows[0] or "| ours | 20 | 42, 43, 44 |" in rows[1]
    pooled = next(r for r in rows if "42, 43, 44" in r)
    assert f"| {mean:.2f} ± {std:.2f} |" in pooled
    assert "`seed43`" in pooled and "`authors`" not in pooled
    assert "| authors' | 20 | 42 |" in next(r for r in rows if r is not pooled)


def test_add_split_recomputes_the_split_of_an_older_summary(workspace):
    readme, static = workspace
    results_file = static / "runs" / "tiny_mnist_pfedhn" / "results.json"
    assert "split" not in json.loads(results_file.read_text())
    main(["--readme", str(readme), "--static", str(static),
          "--add-split", "tiny_mnist_pfedhn", str(TINY_MNIST)])
    split = json.loads(results_file.read_text())["split"]
    clients = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(5, 2, 500, 42))
    assert [c["train"] for c in split["clients"]] == [len(c.train_y) for c in clients]
    assert split["partition"] == "classes"


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
    # the copy is pooled into the original's row, and gets its own line on the runs page
    assert [line for line in readme.read_text().splitlines() if "`copy`" in line] == \
        [line for line in readme.read_text().splitlines() if "`tiny_mnist_pfedhn`" in line]
    runs_page = (readme.parent / "docs" / "results.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in runs_page if "tiny_mnist" in line or "copy" in line] \
        == ["| `copy`", "| `tiny_mnist_pfedhn`"]


def test_missing_markers_are_refused(tmp_path, workspace):
    readme, static = workspace
    before = readme.read_text()
    runs_page = readme.parent / "docs" / "results.md"
    runs_page.write_text("# no markers\n")
    with pytest.raises(ValueError, match=f"{runs_page} has no <!-- runs:start -->"):
        main(["--readme", str(readme), "--static", str(static)])
    assert readme.read_text() == before  # refused before anything was written
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="README.md has no <!-- results:start -->"):
        main(["--readme", str(readme), "--static", str(static)])


def test_failed_rounds_and_lost_client_results_are_shown_beside_the_rounds(workspace):
    readme, static = workspace
    path = static / "runs" / "tiny_mnist_pfedhn" / "results.json"
    results = json.loads(path.read_text())
    results["failed_rounds"] = [9, 10]
    results["client_failures"] = [{"round": r, "partition_id": p, "reason": "crashed"}
                                  for r, p in [(8, 1), (9, 0), (10, 3)]]
    path.write_text(json.dumps(results))
    main(["--readme", str(readme), "--static", str(static)])
    row = next(line for line in readme.read_text().splitlines()
               if "`tiny_mnist_pfedhn`" in line and line.startswith("| MNIST | 5 |"))
    assert "| ours | 20 (2 failed, 3 client results lost) | 42 |" in row
    # pooled with a second seed that lost nothing, the row says whose they were
    shutil.copytree(path.parent, static / "runs" / "tiny_mnist_pfedhn_seed43")
    config = OmegaConf.load(static / "runs" / "tiny_mnist_pfedhn_seed43" / "config.yaml")
    config.seed = 43
    OmegaConf.save(config, static / "runs" / "tiny_mnist_pfedhn_seed43" / "config.yaml")
    results |= {"failed_rounds": [], "client_failures": []}
    (static / "runs" / "tiny_mnist_pfedhn_seed43" / "results.json").write_text(json.dumps(results))
    main(["--readme", str(readme), "--static", str(static)])
    row = next(line for line in readme.read_text().splitlines()
               if "`tiny_mnist_pfedhn_seed43`" in line and line.startswith("| MNIST | 5 |"))
    assert "| ours | 20 (seed 42: 2 failed, 3 client results lost) | 42, 43 |" in row


def test_mh_runs_get_their_own_table_with_both_accuracies_cost_and_memory(workspace):
    readme, static = workspace
    runs = static / "runs"
    shutil.copytree(runs / "tiny_mnist_pfedhn", runs / "mh")
    config = OmegaConf.load(runs / "mh" / "config.yaml")
    config.model.variant, config.model.architectures = 2, "mh-cnn"
    config.client.partition = "mh-authors"
    OmegaConf.save(config, runs / "mh" / "config.yaml")
    results = json.loads((runs / "mh" / "results.json").read_text())
    results |= {"best_test_acc": 0.9512, "best_test_round": 7,
                "test_acc_at_best_val": 0.9401, "best_round": 9,
                "timing": {"median_round_s": 12.34},
                "server_memory": {"hypernetwork_bytes": 118 * 2**20,
                                  "optimizer_state_bytes": 236 * 2**20,
                                  "peak_rss_bytes": 3 * 2**30}}
    (runs / "mh" / "results.json").write_text(json.dumps(results))
    main(["--readme", str(readme), "--static", str(static)])
    text = readme.read_text()
    rows = [line for line in text.splitlines() if "`mh`" in line and line.startswith("| MNIST")]
    assert rows == [
        "| MNIST | 5 | MH-pFedHN | all mh-cnn | MH authors' | 20 | 42 | 95.12 (round 7) "
        f"| 94.01 (round 9) | {100 * results['final_test_acc']:.2f} | 12.3 s "
        "| 118 MiB + 236 MiB | 3.0 GiB | `mh` |"]
    # Not pooled into pFedHN's table, and plotted apart (500 rounds, not 5000 steps).
    assert all("MH-pFedHN" not in line for line in text.splitlines()
               if "tiny_mnist_pfedhn" in line)
    assert (static / "accuracy_mnist_mh.png").exists()
    assert not list(static.glob("*_by_network.png"))  # one network: no breakdown
    # A run with a breakdown per network gets its own figure, linked from the README.
    saved = json.loads((runs / "mh" / "results.json").read_text())
    for e in saved["evaluations"]:
        e["test_acc_by_network"] = {"mh-cnn": e["test_acc"], "mh-vgg8": e["test_acc"] / 2}
    (runs / "mh" / "results.json").write_text(json.dumps(saved))
    main(["--readme", str(readme), "--static", str(static)])
    assert (static / "accuracy_mh_by_network.png").exists()
    assert "![accuracy_mh_by_network](_static/accuracy_mh_by_network.png)" in readme.read_text()


def test_a_heterogeneous_run_gets_a_table_per_network_every_100_rounds_and_the_last_100s_mean(
        workspace):
    readme, static = workspace
    evaluations = [{"round": r, "test_acc": r / 1000,
                    "test_acc_by_network": {"mh-cnn": r / 500, "mh-resnet18": r / 2000}}
                   for r in range(251)]
    del evaluations[240]["test_acc_by_network"]["mh-resnet18"]  # its clients not evaluated
    summary = {"name": "five", "results": {"evaluations": evaluations}}
    recent = range(151, 251)
    resnet = [r / 2000 for r in recent if r != 240]
    assert network_table(summary).splitlines() == [
        "| round | mh-cnn | mh-resnet18 | all |",
        "|---|---|---|---|",
        "| 100 | 20.00 | 5.00 | 10.00 |",
        "| 200 | 40.00 | 10.00 | 20.00 |",
        "| 250 | 50.00 | 12.50 | 25.00 |",
        f"| mean, rounds 151-250 | {100 * sum(r / 500 for r in recent) / 100:.2f} "
        f"| {100 * sum(resnet) / len(resnet):.2f} "
        f"| {100 * sum(r / 1000 for r in recent) / 100:.2f} |"]
    # In the README under the MH table, for runs of more than one network only
    runs = static / "runs"
    shutil.copytree(runs / "tiny_mnist_pfedhn", runs / "mh")
    config = OmegaConf.load(runs / "mh" / "config.yaml")
    config.model.variant, config.model.architectures = 2, "blocks"
    OmegaConf.save(config, runs / "mh" / "config.yaml")
    results = json.loads((runs / "mh" / "results.json").read_text())
    results |= {"best_test_acc": 0.5, "best_test_round": 7, "timing": {"median_round_s": 1.0}}
    for e in results["evaluations"]:
        e["test_acc_by_network"] = {"mh-cnn": e["test_acc"], "mh-vgg8": e["test_acc"] / 2}
    (runs / "mh" / "results.json").write_text(json.dumps(results))
    main(["--readme", str(readme), "--static", str(static)])
    text = readme.read_text()
    table = network_table({"name": "mh", "results": results})
    assert f"`mh`, test accuracy per network, pooled over its clients:\n\n{table}\n" in text
    assert text.count("test accuracy per network") == 1  # not for the pFedHN run


def test_runs_with_novel_clients_get_a_row_of_their_phase_partial_or_finished(workspace):
    readme, static = workspace
    runs = static / "runs"
    shutil.copytree(runs / "tiny_mnist_pfedhn", runs / "novel")
    config = OmegaConf.load(runs / "novel" / "config.yaml")
    OmegaConf.update(config, "novel.num_clients", 2, force_add=True)
    OmegaConf.save(config, runs / "novel" / "config.yaml")
    results = json.loads((runs / "novel" / "results.json").read_text())
    novel = {"rounds": 500, "rounds_completed": 120, "best_test_acc": 0.8123,
             "best_test_round": 97, "test_acc_before": 0.2511, "test_acc_after": 0.8002}
    (runs / "novel" / "results.json").write_text(json.dumps(results | {"novel_clients": novel}))
    main(["--readme", str(readme), "--static", str(static)])
    rows = [line for line in readme.read_text().splitlines()
            if "`novel`" in line and "+ 2 |" in line]
    trained = f"{config.num_clients} + 2 | {results['rounds_completed']}"
    assert rows == [f"| MNIST | pFedHN | cnn | {trained} | 120 of 500 | 42 | 81.23 (round 97) "
                    "| 25.11 | 80.02 | `novel` |"]

    (runs / "novel" / "results.json").write_text(
        json.dumps(results | {"novel_clients": novel | {"rounds_completed": 500}}))
    main(["--readme", str(readme), "--static", str(static)])
    assert f"| {trained} | 500 | 42 |" in readme.read_text()
    # runs without novel clients get no such table
    shutil.rmtree(runs / "novel")
    main(["--readme", str(readme), "--static", str(static)])
    assert "Novel clients:" not in readme.read_text()
