"""The benchmark scripts run end to end and write what the README's tables are made of."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_OVERRIDES

FIGURES = ("plain_round_s", "flower_round_s", "evaluation_round_s", "full_protocol_estimate_s")


@pytest.mark.simulation
def test_round_cost_writes_its_figures_without_machine_paths_and_renders_a_row(tmp_path):
    figures_file, page = tmp_path / "cost.json", tmp_path / "page.md"
    script = [sys.executable, str(REPO / "benchmarks" / "round_cost.py")]
    subprocess.run([*script, "--rounds", "6", "--json", str(figures_file), *TINY_OVERRIDES,
                    "device=cpu"], cwd=tmp_path, check=True, capture_output=True, timeout=600)

    figures = json.loads(figures_file.read_text())
    assert all(figures[key] > 0 for key in FIGURES)
    evaluations = len(range(0, 5000, 30)) + 1  # the protocol: every 30 rounds and the last
    assert figures["full_protocol_estimate_s"] == pytest.approx(
        5000 * figures["flower_round_s"] + evaluations * figures["evaluation_round_s"])
    assert figures["flower_over_plain"] == pytest.approx(
        figures["flower_round_s"] / figures["plain_round_s"])
    assert figures["plain_repeats_bit_for_bit"] is True
    assert figures["settings"]["inline_bytes"] == 4 * 2**20
    assert "dataset.root=<tiny_mnist>" in figures["settings"]["overrides"]
    assert str(REPO) not in figures_file.read_text()

    page.write_text("before\n<!-- round_cost:start -->\nold row\n<!-- round_cost:end -->\nafter\n")
    subprocess.run([*script, "--render", str(figures_file), "--into", str(page)], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old row" not in text
    assert ("`cost.json` (10 clients, 6 rounds, poll_interval 0.01, inline_bytes 4194304)"
            in text)
    assert f"| {figures['flower_over_plain']:.2f} |" in text
