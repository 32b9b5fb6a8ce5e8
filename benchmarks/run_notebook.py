"""Run a notebook's code cells as one script, without Jupyter (the GPU machine has no nbformat/nbclient).

    python benchmarks/run_notebook.py notebooks/02_tree_verification.ipynb OUTDIR

Cells run in order in one namespace, with matplotlib's Agg backend; every figure a cell shows is saved
as OUTDIR/<notebook>_cellN_figK.png. A failing cell stops the run with its traceback.
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, outdir: str) -> None:
    nb = json.loads(pathlib.Path(path).read_text())
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stem = pathlib.Path(path).stem
    namespace = {"__name__": "__main__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells):
        shown = []
        plt.show = lambda *a, **k: shown.append(plt.gcf())  # noqa: E731 - collect instead of display
        print(f"--- cell {i + 1}/{len(cells)}", flush=True)
        exec(compile("".join(cell["source"]), f"{stem}:cell{i + 1}", "exec"), namespace)
        for k, fig in enumerate(shown):
            fig.savefig(out / f"{stem}_cell{i + 1}_fig{k + 1}.png", dpi=80, bbox_inches="tight")
            plt.close(fig)
    print(f"--- {stem}: {len(cells)} code cells ran", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
