"""The package's layout: which parts load which (docs/extending.md draws it)."""

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
