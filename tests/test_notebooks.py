"""Every notebook in examples/ runs top to bottom on the tiny random model, and is
committed with the outputs of a run on SmolLM2-135M (scripts/execute_notebooks.py).

As papermill does, a cell setting small parameters is inserted right after the cell
tagged `parameters`. The kernel is ipykernel on the interpreter running the tests
(`sys.executable`), through a kernel spec written to a temporary directory, so the
notebooks see this environment's TransformerLens and tl-transcoders whatever kernels
are installed elsewhere. A failing cell fails the test with its traceback.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
executor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(executor)
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT_S = 300

TINY = {"MODEL": "tiny"}
"""Parameters every notebook gets under test; the sizes below are per notebook."""
SIZES = {
    "quickstart.ipynb": dict(
        LAYER=2, TRAIN_TOKENS=8 * 8 * 64, EVAL_TOKENS=2 * 8 * 64, BATCH_SIZE=8, CONTEXT_SIZE=64, EXPANSION=4, K=8
    ),
    "circuits.ipynb": dict(TRAIN_TOKENS=8 * 8 * 64, BATCH_SIZE=8, CONTEXT_SIZE=64, EXPANSION=4, K=8),
    "seed_comparison.ipynb": dict(
        LAYERS=[1, 2], TOKENS=8 * 6 * 32, BATCH_SIZE=8, CONTEXT_SIZE=32, HELDOUT_ROWS=6, EXPANSION=2, K=4
    ),
}


def parameters_cell(notebook) -> int:
    """Index of the cell tagged `parameters`."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets}


def inject_parameters(notebook, parameters: dict) -> None:
    """Insert a cell setting `parameters` after the `parameters` cell (papermill's way);
    every name must be a parameter the notebook declares."""
    index = parameters_cell(notebook)
    unknown = set(parameters) - assigned_names(notebook.cells[index].source)
    assert not unknown, f"not parameters of this notebook: {sorted(unknown)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    return executor.kernel_spec_manager(tmp_path_factory.mktemp("kernels"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_spec_manager: KernelSpecManager) -> None:
    notebook = nbformat.read(path, as_version=4)
    inject_parameters(notebook, {**TINY, **SIZES.get(path.name, {})})
    kernel = KernelManager(kernel_name=executor.KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable, end='')"))
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell failed\n{error}", pytrace=False)
    finally:
        if kernel.has_kernel:  # a kernel manager passed in is ours to shut down
            kernel.shutdown_kernel(now=True)
    assert notebook.cells[-1].outputs[0].text == sys.executable, "the kernel ran on another interpreter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_ran_on_smollm2(path: Path) -> None:
    """Committed notebooks declare their parameters and carry the outputs of one run of
    every code cell, in order, on SmolLM2 with those parameters: no error, no absolute
    path of the machine that ran them."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    parameters = notebook.cells[parameters_cell(notebook)]
    assert 'MODEL = "smollm2"' in parameters.source.splitlines()[0], "run it on SmolLM2: scripts/execute_notebooks.py"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    injected = [cell for cell in code if "injected-parameters" in cell.metadata.get("tags", [])]
    assert not injected, "committed with overridden parameters: run it with its own"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"cells not run once each, top to bottom: {counts}"
    errors = [i for i, cell in enumerate(notebook.cells) for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"cells {errors} failed"
    assert all(cell.outputs for cell in code if "print(" in cell.source), "a printing cell has no output"
    leaks = executor.absolute_paths(notebook)
    assert not leaks, f"outputs name absolute paths (cell, prefix): {leaks[:5]}"
