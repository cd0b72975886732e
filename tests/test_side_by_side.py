"""benchmarks/side_by_side.py against stand-in checkouts of the authors' code that the tests write.

The stand-ins keep the authors' layout, command lines and log lines, train
nothing real, and write down what they did (their steps' and evaluations'
durations, the accuracies they logged, the data they were served). The
benchmark's figures must equal that record: a wrong split of steps from
evaluations, a misread log or a wrong network block fails here. No speed
target is tested.
"""

import dataclasses
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, TINY_OVERRIDES

sys.path.insert(0, str(REPO / "benchmarks"))
import side_by_side  # noqa: E402

STEP_S, EVALUATION_S = 0.02, 0.15  # what the stand-ins sleep

# Their pFedHN trainer's shape: argparse, logging, `for step in trange(...)`, an
# optimizer step a step, "Step: <n>, AVG Loss: ..,  AVG Acc: .." at evaluations.
PFEDHN_TRAINER = f"""
import argparse, json, logging, time
from pathlib import Path
import torch
from tqdm import trange
from experiments.dataset import load

parser = argparse.ArgumentParser()
for name in ("--data-name", "--data-path", "--save-path"):
    parser.add_argument(name)
for name in ("--num-nodes", "--num-steps", "--eval-every", "--seed"):
    parser.add_argument(name, type=int)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)
train, test = load(args.data_path)
weight = torch.zeros(1, requires_grad=True)
optimizer = torch.optim.SGD([weight], lr=0.1)
done = {{"served": [len(train), len(test), int(sum(train.targets)), list(train.data.shape)],
         "step_s": [], "evaluation_s": [], "accuracy": []}}
for step in trange(args.num_steps):
    start = time.perf_counter()
    time.sleep({STEP_S})
    optimizer.zero_grad()
    weight.sum().backward()
    optimizer.step()
    done["step_s"].append(time.perf_counter() - start)
    if step % args.eval_every == 0:
        start = time.perf_counter()
        time.sleep({EVALUATION_S})
        accuracy = round(0.1 + step / 1000 + args.seed / 1e4, 4)
        logging.info(f"\\nStep: {{step + 1}}, AVG Loss: 2.3000,  AVG Acc: {{accuracy:.4f}}")
        done["accuracy"].append([step + 1, accuracy])
        done["evaluation_s"].append(time.perf_counter() - start)
Path(args.save_path).mkdir(parents=True)
(Path(args.save_path) / "done.json").write_text(json.dumps(done))
"""
PFEDHN_DATASET = """
from torchvision.datasets import CIFAR10

def load(root):
    return CIFAR10(root, train=True, download=True), CIFAR10(root, train=False, download=True)
"""
# MH-pFL's shape: a script at the top, display.ExperimentLogger, config/ read from cwd.
MH_TRAINER = """
import argparse, time
import torch
from tqdm import trange
from display import ExperimentLogger

parser = argparse.ArgumentParser()
for name in ("--data-name", "--data-path", "--optim", "--save-dir", "--only-cnn"):
    parser.add_argument(name)
for name in ("--num-nodes", "--num-steps", "--seed", "--cuda"):
    parser.add_argument(name, type=int)
parser.add_argument("--lr", type=float)
args = parser.parse_args()
open("config/defaults.yaml").read()
weight = torch.zeros(1, requires_grad=True)
optimizer = torch.optim.Adam([weight], lr=args.lr)
stats = ExperimentLogger()
for step in trange(args.num_steps):
    for client in range(args.num_nodes):
        optimizer.zero_grad()
        weight.sum().backward()
        optimizer.step()
    time.sleep(0.05)
    accs = [(client + step) / 100 for client in range(args.num_nodes)]
    print(f"Step: {step + 1}, AVG Loss: 1.0000,  AVG Acc: {sum(accs) / len(accs):.4f}")
    stats.log({"rounds": step, "client_acc": accs, "client_loss": accs})
"""
MH_DISPLAY = """
class ExperimentLogger:
    def log(self, values):
        for k, v in values.items():
            self.__dict__.setdefault(k, []).append(v)
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A CIFAR-10-shaped image folder: 10 classes, 3 training and 2 test images each."""
    root = tmp_path_factory.mktemp("cifar10-folder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pfedhn_checkout(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("pFedHN"), {
        "experiments/__init__.py": "", "experiments/pfedhn/__init__.py": "",
        "experiments/dataset.py": PFEDHN_DATASET, "experiments/pfedhn/trainer.py": PFEDHN_TRAINER,
        "experiments/pfedhn_pc/trainer.py": "raise SystemExit('not this one')"})


@pytest.fixture(scope="module")
def mh_checkout(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("MH-pFL"), {
        "MH-pFedHN.py": MH_TRAINER, "MH-pFedHNGD.py": MH_TRAINER, "dataset.py": "",
        "display.py": MH_DISPLAY, "config/defaults.yaml": "cifar10: {}"})


# The pFedHN setting at the tiny MNIST scale: our side's data and clients replaced.
TINY_PFEDHN = dataclasses.replace(side_by_side.SETTINGS["pfedhn"], eval_every=3,
                                  ours=("algorithm=pfedhn", "client.inner_steps=5"))


@pytest.fixture(scope="module")
def runs_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def comparison(pfedhn_checkout, image_folder, runs_out) -> dict:
    """Two alternations of the stand-in and a real `python -m pFedHN.main` on tiny MNIST."""
    return side_by_side.compare(
        "pfedhn", TINY_PFEDHN, pfedhn_checkout, image_folder, units=7, repeats=2, seed=3,
        out=runs_out, data_overrides=TINY_OVERRIDES, extra=["num_clients=4"])


@pytest.mark.simulation
def test_the_sides_alternate_and_the_authors_figures_are_what_their_run_did(comparison,
                                                                         runs_out):
    assert comparison["order"] == ["authors", "ours", "authors", "ours"]
    for repeat, run in enumerate(comparison["runs"]["authors"]):
        done = json.loads((runs_out / "pfedhn" / f"authors_{repeat}" / "authors_output"
                           / "done.json").read_text())
        # served from the folder by the shim, in ImageFolder's order
        assert done["served"] == [30, 20, 3 * sum(range(10)), [30, 32, 32, 3]]
        assert run["trajectory"] == done["accuracy"]  # steps 1, 4, 7 at eval_every 3
        assert [step for step, _ in run["trajectory"]] == [1, 4, 7]
        assert run["units"] == 7
        plain = [s for i, s in enumerate(done["step_s"]) if i % 3]
        assert run["median_unit_s"] == pytest.approx(statistics.median(plain), abs=0.012)
        assert run["median_evaluation_s"] == pytest.approx(
            statistics.median(done["evaluation_s"]), abs=0.012)
        assert run["full_protocol_estimate_s"] == pytest.approx(
            5000 * run["median_unit_s"] + 168 * run["median_evaluation_s"])


@pytest.mark.simulation
def test_our_figures_are_our_runs_results(comparison, runs_out):
    for repeat, run in enumerate(comparison["runs"]["ours"]):
        results = json.loads((runs_out / "pfedhn" / f"ours_{repeat}" / "results.json")
                             .read_text())
        assert run["trajectory"] == [[e["round"], e["test_acc"]] for e in results["evaluations"]]
        assert [r for r, _ in run["trajectory"]] == [0, 3, 6, 7]
        assert run["median_unit_s"] == results["timing"]["median_round_s"]
        assert run["full_protocol_estimate_s"] == pytest.approx(
            5000 * run["median_unit_s"] + 168 * run["median_evaluation_s"])
    # same seed, same run: the two repeats walk the same trajectory
    ours = comparison["runs"]["ours"]
    assert ours[0]["trajectory"] == ours[1]["trajectory"]


@pytest.mark.simulation
def test_the_ratios_are_medians_over_repeats_and_no_machine_path_is_kept(comparison, tmp_path):
    runs = comparison["runs"]
    for key, ratio in comparison["ratios"].items():
        assert ratio == pytest.approx(statistics.median(r[key] for r in runs["ours"])
                                      / statistics.median(r[key] for r in runs["authors"]))
    store = tmp_path / "side_by_side.json"
    side_by_side.add_to_json(store, comparison, note="the test suite")
    text = store.read_text()
    assert str(REPO) not in text and "/tmp" not in text and str(tmp_path) not in text
    assert "--num-steps 7" in json.loads(text)["settings"]["pfedhn"]["commands"]["authors"]


def cnn_target_training_flops_per_sample() -> int:
    """The tiny MNIST CNNTarget (7 kernels, 28 x 28 inputs), counted by hand.

    Multiply-adds of the forward pass per layer; training takes the forward, the
    weight gradients (the same again) and the input gradients of every layer but
    the first (whose input needs none); 2 FLOPs a multiply-add.
    """
    macs = [7 * 24 * 24 * 1 * 25, 14 * 8 * 8 * 7 * 25, 14 * 4 * 4 * 120, 120 * 84, 84 * 10]
    return 2 * (3 * sum(macs) - macs[0])


@pytest.mark.simulation
def test_the_compute_floor_counts_a_steps_flops_and_divides_by_our_client_time(
        comparison, runs_out):
    floor = side_by_side.floor(comparison, runs_out / "pfedhn" / "ours_0")
    flops = 5 * 64 * cnn_target_training_flops_per_sample()  # inner_steps x batch x per sample
    assert floor["training_gflop_per_unit"] == pytest.approx(flops / 1e9)
    results = json.loads((runs_out / "pfedhn" / "ours_0" / "results.json").read_text())
    timing = results["timing"]
    assert floor["ours_client_gflops"] == pytest.approx(flops / 1e9 / timing["median_client_s"])
    authors_s = statistics.median(r["median_unit_s"] for r in comparison["runs"]["authors"])
    assert floor["authors_unit_gflops"] == pytest.approx(flops / 1e9 / authors_s)
    assert floor["ours_parts_s"] == {
        "unit_s": timing["median_round_s"], "clients_s": timing["median_client_s"],
        "server_s": timing["median_server_s"],
        "evaluation_s": statistics.median(e["evaluation_time_s"] for e in results["evaluations"])}
    assert floor["matmul_gflops"] > 0


@pytest.mark.simulation
def test_floor_on_the_command_line_takes_the_named_settings_run_and_names_a_missing_one(
        comparison, runs_out, tmp_path, monkeypatch, capsys):
    store = tmp_path / "side_by_side.json"
    side_by_side.add_to_json(store, comparison, note="the test suite")
    side_by_side.add_to_json(store, comparison | {"setting": "pfedhn_pc"}, note="the test suite")
    monkeypatch.setattr(side_by_side, "matmul_gflops", lambda: 100.0)
    command = ["side_by_side.py", "--floor", "--json", str(store), "--out", str(runs_out)]
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(SystemExit):  # pfedhn_pc has no run of ours in runs_out
        side_by_side.main()
    assert f"pfedhn_pc ({runs_out / 'pfedhn_pc' / 'ours_0'})" in capsys.readouterr().err
    assert "floor" not in json.loads(store.read_text())["settings"]["pfedhn"]  # nothing written
    monkeypatch.setattr(sys, "argv", [*command, "--setting", "pfedhn"])
    side_by_side.main()
    settings = json.loads(store.read_text())["settings"]
    assert settings["pfedhn"]["floor"] == side_by_side.floor(
        comparison, runs_out / "pfedhn" / "ours_0")
    assert "floor" not in settings["pfedhn_pc"]


@pytest.mark.simulation
def test_render_writes_the_table_row_and_a_trajectory_figure(comparison, tmp_path):
    store, page = tmp_path / "side_by_side.json", tmp_path / "README.md"
    side_by_side.add_to_json(store, comparison, note="the test suite")
    page.write_text(f"before\n{side_by_side.START}\nold\n{side_by_side.END}\nafter\n")
    side_by_side.render(store, page, tmp_path / "figures")
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `pfedhn`"))
    authors = statistics.median(r["full_protocol_estimate_s"]
                                for r in comparison["runs"]["authors"])
    assert f"{authors:,.0f} / " in row and "A O A O" in row
    assert f"`pfedhn`: {side_by_side.machine()['cpu']}, " in text and "(the test suite)." in text
    assert f"**{comparison['ratios']['full_protocol_estimate_s']:.2f}x**" in row
    assert (tmp_path / "figures" / "side_by_side_pfedhn.png").stat().st_size > 10_000
    docs = tmp_path / "performance.md"
    docs.write_text(f"{side_by_side.FLOOR_START}\n{side_by_side.FLOOR_END}\n")
    side_by_side.add_to_json(store, comparison | {"floor": {
        "training_gflop_per_unit": 1.5, "ours_client_gflops": 50.0, "authors_unit_gflops": 40.0,
        "matmul_gflops": 100.0, "ours_parts_s": {
            "unit_s": 0.5, "clients_s": 0.25, "server_s": 0.125, "evaluation_s": 0.07}}}, "test")
    side_by_side.render(store, page, tmp_path / "figures", docs)
    assert "| `pfedhn` | 1.5 GFLOP | 50 GFLOP/s | 40 GFLOP/s | 100 GFLOP/s | 0.500 / " \
           "0.250 / 0.125 / 0.070 s |" in docs.read_text()


@pytest.mark.simulation
def test_against_an_earlier_run_of_ours_runs_only_the_authors_and_sets_the_curves_side_by_side(
        comparison, runs_out, pfedhn_checkout, image_folder, tmp_path):
    ours_run, ours_data = runs_out / "pfedhn" / "ours_0", [*TINY_OVERRIDES, "num_clients=4"]
    with pytest.raises(side_by_side.CheckoutError, match="its seed is 3, the setting with"):
        side_by_side.check_against(TINY_PFEDHN, ours_run, 4, ours_data)
    entry = side_by_side.against("pfedhn", TINY_PFEDHN, pfedhn_checkout, image_folder, units=7,
                                 repeats=1, run_dir=ours_run, seed=3, out=tmp_path,
                                 data_overrides=ours_data)
    assert entry["order"] == ["authors"] and "ratios" not in entry
    read = entry["runs"]["ours"][0]  # read from the run, not run again
    assert read == comparison["runs"]["ours"][0] | {"wall_s": read["wall_s"]}
    done = json.loads((tmp_path / "pfedhn" / "authors_0" / "authors_output" / "done.json")
                      .read_text())
    authors = entry["runs"]["authors"][0]["trajectory"]
    assert authors == done["accuracy"] and [r for r, _ in authors] == [1, 4, 7]

    store = tmp_path / "side_by_side.json"
    side_by_side.add_to_json(store, comparison, note="the test suite")
    side_by_side.add_to_json(store, entry, note="the test suite")
    saved = json.loads(store.read_text())
    assert saved["settings"]["pfedhn"]["order"] == ["authors", "ours"] * 2  # kept apart
    assert saved["against_runs"]["pfedhn"]["against_run"] == "ours_0"
    page, docs = tmp_path / "README.md", tmp_path / "performance.md"
    page.write_text(f"{side_by_side.START}\n{side_by_side.END}\n")
    docs.write_text(f"{side_by_side.FLOOR_START}\n{side_by_side.FLOOR_END}\n"
                    f"{side_by_side.AGAINST_START}\n{side_by_side.AGAINST_END}\n")
    side_by_side.render(store, page, tmp_path / "figures", docs)
    assert (tmp_path / "figures" / "side_by_side_pfedhn_against_run.png").stat().st_size > 10_000
    ours = dict(map(tuple, entry["runs"]["ours"][0]["trajectory"]))  # rounds 0, 3, 6, 7
    a = dict(map(tuple, authors))
    assert (f"| all clients (pooled) | {100 * a[1]:.1f} / - | {100 * a[4]:.1f} / - | "
            f"{100 * a[7]:.1f} / {100 * ours[7]:.1f} |") in docs.read_text()


def test_the_five_network_setting_reads_each_networks_block(mh_checkout, image_folder,
                                                          tmp_path):
    setting = dataclasses.replace(side_by_side.SETTINGS["mh_pfedhn_five"], authors_args=(
        "--data-name", "cifar10", "--num-nodes", "12", "--optim", "adam", "--lr", "2e-4",
        "--only-cnn", "False"))
    figures = side_by_side.run_authors(setting, mh_checkout, image_folder, units=3, seed=1,
                                       device="cpu", out=tmp_path)
    # 12 clients in blocks 3, 3, 2, 2, 2; client c's accuracy (c + round - 1) / 100
    assert figures["trajectory"] == [[r, round((5.5 + r - 1) / 100, 4)] for r in (1, 2, 3)]
    for network, mean_client in (("mh-cnn", 1), ("mh-vgg8", 4), ("mh-resnet10", 6.5),
                                ("mh-resnet18", 10.5)):
        assert figures["trajectory_by_network"][network] == [
            [r, pytest.approx((mean_client + r - 1) / 100)] for r in (1, 2, 3)]
    # every round evaluates: a round's time holds it, and 500 of them are the protocol
    assert figures["median_evaluation_s"] >= 0.05
    assert figures["full_protocol_estimate_s"] == pytest.approx(500 * figures["median_unit_s"])


def test_a_wrong_checkout_or_data_folder_is_one_line_naming_what_was_expected(
        mh_checkout, pfedhn_checkout, image_folder, tmp_path):
    script = [sys.executable, str(REPO / "benchmarks" / "side_by_side.py")]
    wrong = subprocess.run([*script, "--authors", str(mh_checkout), "--data", str(image_folder),
                            "--setting", "pfedhn"], capture_output=True, text=True)
    assert wrong.returncode != 0
    assert wrong.stderr.strip().count("\n") == 0
    assert "https://github.com/AvivSham/pFedHN" in wrong.stderr
    assert "experiments/pfedhn/trainer.py" in wrong.stderr
    no_test = tmp_path / "cifar"
    (no_test / "train").mkdir(parents=True)
    wrong = subprocess.run([*script, "--authors", str(pfedhn_checkout), "--data", str(no_test),
                            "--setting", "pfedhn"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "test/" in wrong.stderr and str(no_test) in wrong.stderr
