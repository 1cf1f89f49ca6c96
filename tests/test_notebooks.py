"""Every notebook in examples/ runs top to bottom on the tiny random model.

As papermill does, a cell setting small parameters is inserted right after the cell
tagged `parameters`. The kernel is ipykernel on the interpreter running the tests
(`sys.executable`), through a kernel spec written to a temporary directory, so the
notebooks see this environment's TransformerLens and tl-transcoders whatever kernels
are installed elsewhere. A failing cell fails the test with its traceback.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL_NAME = "tl-transcoders-tests"
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
    """A kernel spec manager that knows one kernel: ipykernel on `sys.executable`, with
    examples/ on its path as when a notebook runs from its own folder."""
    directory = tmp_path_factory.mktemp("kernels")
    spec = directory / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    env = {"PYTHONPATH": str(EXAMPLES)}  # the notebooks import their helper modules from beside them
    kernel = {"argv": argv, "display_name": KERNEL_NAME, "language": "python", "env": env}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return KernelSpecManager(kernel_dirs=[str(directory)], ensure_native_kernel=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_spec_manager: KernelSpecManager) -> None:
    notebook = nbformat.read(path, as_version=4)
    inject_parameters(notebook, {**TINY, **SIZES.get(path.name, {})})
    kernel = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
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
def test_notebook_is_clean(path: Path) -> None:
    """Committed notebooks carry no outputs and declare their parameters."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    parameters = notebook.cells[parameters_cell(notebook)]
    assert "MODEL" in assigned_names(parameters.source)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {index} has outputs: clear them"
