"""The layers import downwards only: integer rules <- quant <- backend <- engine; `import hat.quant` stays light."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

HAT = Path(__file__).resolve().parents[2] / "hat"
# package -> packages it must never import at module level
FORBIDDEN = {"integer": ("hat.quant", "hat.backend", "hat.engine", "hat.models", "hat.data"),
             "quant": ("hat.backend", "hat.engine", "hat.models", "hat.data"),
             "backend": ("hat.engine", "hat.models", "hat.data")}


def _module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:  # top level only: a function may import lazily
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_above_it(package):
    wrong = [f"{path.relative_to(HAT.parent)} imports {name}" for path in sorted((HAT / package).rglob("*.py"))
             for name in _module_level_imports(path) if name.startswith(FORBIDDEN[package])]
    assert not wrong, "\n".join(wrong)


def test_importing_hat_quant_loads_neither_the_engine_nor_the_backend():
    code = ("import sys, hat.quant; print(sorted(m for m in sys.modules if m.startswith(('hat.engine', "
            "'hat.backend', 'hat.data', 'hat.models', 'omegaconf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=HAT.parent).stdout
    assert out.strip() == "[]"
