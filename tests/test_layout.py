"""The package's layout: which parts load which (docs/extending.md draws it)."""

import ast
import subprocess
import sys

from tests.conftest import REPO


def loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_server_side_loads_no_data_code():
    """A deployed server holds no data: its modules never load the data code (or PIL)."""
    for module in ("pFedHN.server", "pFedHN.strategy"):
        loaded = loaded_after(module)
        assert not loaded & {"pFedHN.dataset", "pFedHN.config", "PIL", "torchvision", "hydra"}, \
            module
        assert "pFedHN.networks" in loaded or module == "pFedHN.strategy"


def test_no_class_is_over_200_lines_and_no_init_takes_more_than_8_parameters():
    """Rooms a reader takes in at once: larger parts are split by what they hold."""
    for path in sorted((REPO / "pFedHN").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 200, f"{path.name}: {node.name}"
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                args = node.args
                count = len(args.args) - 1 + len(args.kwonlyargs)
                assert count <= 8, f"{path.name}:{node.lineno}: {count} parameters"


def test_the_readme_stays_a_page_a_newcomer_reads_in_one_go():
    """Flower's baselines keep their READMEs short; the long form lives in docs/."""
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move detail into docs/"
