"""The outputs stored in the notebooks (figures, printed results) are current: what the code produces now.

Every notebook in `nbs/` that holds outputs is run fresh with execnb's `CaptureShell` (what `nbdev_test` uses; PNG
figures as the Jupyter kernel of CONTRIBUTING's refresh command makes them), in one subprocess so that no notebook
state reaches the other tests, and each code cell's stored outputs are compared with the fresh ones:
- text (stream, text/plain, text/markdown, any other non-image type) must be equal after normalising only what is
  volatile: object addresses (`0x7f3a...` -> `0x...`) and `%time` lines (`CPU times: ...`, `Wall time: ...`);
  consecutive stream chunks are joined, and since `CaptureShell` collects printed text apart from displayed objects,
  the order of prints relative to figures within one cell is not compared (their content is);
- images (image/png) are decoded to RGBA pixel arrays: same shape, and every channel of every pixel within
  `PIXEL_TOLERANCE` levels of 255. A re-run on the pinned matplotlib gives the same pixels; the margin only absorbs
  float noise (e.g. another BLAS thread count) that moves a value across one or two entries of a colormap (adjacent
  entries of viridis, magma and RdBu differ by at most 4 levels). A changed constant, seed or title moves far more;
- a cell with outputs stored but none fresh (or the reverse) fails, naming notebook, cell and first source line.
Cells `nbdev_test` skips (`#| eval: false`, the settings' `tst_flags`, `nbdev_export()` calls) are skipped and not
compared. Each message says how to refresh the outputs (CONTRIBUTING.md)."""
import base64
import configparser
import difflib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
TOUR = ("01_dct", "02_priors", "03_router", "04_moppa", "06_coeff")   # notebooks that must keep their figures
PIXEL_TOLERANCE = 8
VOLATILE = ((re.compile(r"0x[0-9a-fA-F]{4,}"), "0x..."),
            (re.compile(r"^(CPU times|Wall time):.*$", re.M), r"\1: ..."))


def refresh_command(notebook: Path) -> str:
    return (f"HF_HUB_OFFLINE=1 .venv/bin/jupyter nbconvert --to notebook --execute --inplace "
            f"{notebook.relative_to(ROOT)} && .venv/bin/nbdev_clean")


def notebooks_with_outputs(folder: Path = NBS) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts
            and any(c.get("outputs") for c in json.loads(p.read_text())["cells"])]


def nbdev_test_flags() -> list[str]:
    settings = configparser.ConfigParser()
    settings.read(ROOT / "settings.ini")
    return settings["DEFAULT"].get("tst_flags", "").split("|")


def skipped(source: str, flags: list[str]) -> bool:
    "Whether `nbdev_test` skips this code cell: `#| eval: false`, a `tst_flags` directive, or an export call."
    directives = re.findall(r"^#\|\s*(.*?)\s*$", source, re.M)
    return ("nbdev_export(" in source or any(re.fullmatch(r"eval:\s*false", d, re.I) for d in directives)
            or any(d.split(":")[0].split()[0] in flags for d in directives if d))


def first_line(source) -> str:
    text = "".join(source).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 80 else line[:77] + "..."


def _text(value) -> str:
    text = "".join(value) if isinstance(value, list) else str(value)
    for pattern, replacement in VOLATILE: text = pattern.sub(replacement, text)
    return text


def summarise(outputs: list[dict]) -> tuple[dict, list]:
    "A cell's outputs as (stream name -> joined text, [(output type, {mime type: value}) of displayed objects])."
    streams, shown = {}, []
    for out in outputs:
        if out["output_type"] == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + _text(out["text"])
        elif out["output_type"] == "error":
            shown.append(("error", {"text/plain": f"{out['ename']}: {out['evalue']}"}))
        else:
            shown.append((out["output_type"], dict(out.get("data", {}))))
    return {k: _text(v) for k, v in streams.items()}, shown


def pixels(png) -> np.ndarray:
    data = "".join(png) if isinstance(png, list) else png
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGBA"), dtype=np.int16)


def compare_images(stored, fresh) -> str | None:
    old, new = pixels(stored), pixels(fresh)
    if old.shape != new.shape:
        return f"image size {old.shape[1]}x{old.shape[0]} stored, {new.shape[1]}x{new.shape[0]} now"
    far = (np.abs(old - new) > PIXEL_TOLERANCE).any(-1)
    if not far.any(): return None
    rows, cols = np.nonzero(far)
    return (f"{far.sum()} of {far.size} pixels differ by more than {PIXEL_TOLERANCE}/255 (max {np.abs(old - new).max()}), "
            f"rows {rows.min()}-{rows.max()}, columns {cols.min()}-{cols.max()}")


def compare_texts(what: str, stored: str, fresh: str) -> str | None:
    if stored == fresh: return None
    diff = difflib.unified_diff(stored.splitlines(), fresh.splitlines(), "stored", "now", lineterm="", n=1)
    return f"{what} differs:\n      " + "\n      ".join(list(diff)[:12])


def _describe(shown) -> str:
    return "[" + ", ".join(f"{kind} {'+'.join(data)}" for kind, data in shown) + "]"


def compare_cell(stored: list[dict], fresh: list[dict]) -> list[str]:
    "How a cell's fresh outputs differ from its stored ones (empty when they match)."
    if stored and not fresh: return ["outputs are stored but the code produces none now (missing)"]
    if fresh and not stored:
        streams, shown = summarise(fresh)
        printed = [f"{name} {first_line(text)!r}" for name, text in streams.items()]
        return [f"the code produces outputs that are not stored (extra): " + ", ".join(printed + [_describe(shown)] * bool(shown))]
    (old_streams, old_shown), (new_streams, new_shown) = summarise(stored), summarise(fresh)
    problems = [compare_texts(name, old_streams.get(name, ""), new_streams.get(name, ""))
                for name in sorted(set(old_streams) | set(new_streams))]
    if len(old_shown) != len(new_shown):
        problems.append(f"{len(old_shown)} displayed outputs stored {_describe(old_shown)}, "
                        f"{len(new_shown)} now {_describe(new_shown)} (missing or extra)")
    for i, ((old_kind, old), (new_kind, new)) in enumerate(zip(old_shown, new_shown)):
        where = f"displayed output {i + 1}"
        if (old_kind, sorted(old)) != (new_kind, sorted(new)):
            problems.append(f"{where}: stored {old_kind} {sorted(old)}, now {new_kind} {sorted(new)}")
            continue
        for mime in sorted(old):
            problems.append(compare_images(old[mime], new[mime]) if mime == "image/png" else
                            compare_texts(mime, _text(old[mime]), _text(new[mime])))
            if problems[-1] and mime == "image/png": problems[-1] = f"{where} (image/png): {problems[-1]}"
    return [p for p in problems if p]


def compare_notebook(notebook: Path, stored_cells: list[dict], fresh: dict) -> list[str]:
    "One line per differing cell of `notebook`; `fresh` is what `execute` returned for it."
    if fresh["error"]: return [fresh["error"]]
    problems = []
    for index, cell in enumerate(stored_cells):
        if cell["cell_type"] != "code" or index in fresh["skipped"]: continue
        for problem in compare_cell(cell.get("outputs", []), fresh["outputs"][index]):
            problems.append(f"{notebook.relative_to(ROOT)}, cell {index} (`{first_line(cell['source'])}`): {problem}")
    return problems


def execute(paths: list[Path]) -> dict:
    "Run each notebook in a fresh `CaptureShell` from its folder: {path: {outputs per cell, skipped, error, seconds}}."
    from execnb.nbio import nb2dict, read_nb
    from execnb.shell import CaptureShell
    results, flags = {}, nbdev_test_flags()
    for path in paths:
        start, nb, error, skips = time.time(), read_nb(path), None, []
        os.chdir(path.parent)
        shell = CaptureShell(path, mpl_format="png")
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            cell.outputs = []
            if skipped(cell.source, flags):
                skips.append(index); continue
            shell.cell(cell)
            if shell.exc:
                error = (f"{path.relative_to(ROOT)}, cell {index} (`{first_line(cell.source)}`) raised "
                         f"{type(shell.exc).__name__}: {shell.exc}")
                break
        results[str(path)] = {"outputs": [c.get("outputs", []) for c in nb2dict(nb)["cells"]], "skipped": skips,
                              "error": error, "seconds": round(time.time() - start, 1)}
    return results


@pytest.fixture(scope="module")
def fresh_outputs(tmp_path_factory) -> dict:
    "Every notebook with stored outputs, run once in a subprocess (no notebook state reaches the other tests)."
    out = tmp_path_factory.mktemp("fresh") / "outputs.json"
    paths = notebooks_with_outputs()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, __file__, str(out), *map(str, paths)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"running the notebooks failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_the_tour_notebooks_hold_their_figures():
    holding = {p.stem for p in notebooks_with_outputs()}
    for name in TOUR:
        cells = json.loads((NBS / f"{name}.ipynb").read_text())["cells"]
        assert name in holding and any("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", [])), (
            f"nbs/{name}.ipynb holds no figure: its outputs were cleared (settings.ini must keep clear_all = False); "
            f"restore them with: {refresh_command(NBS / f'{name}.ipynb')}")


@pytest.mark.parametrize("notebook", notebooks_with_outputs(), ids=lambda p: p.stem)
def test_stored_outputs_are_what_the_notebook_produces_now(notebook, fresh_outputs):
    stored, error = json.loads(notebook.read_text())["cells"], fresh_outputs[str(notebook)]["error"]
    if error: pytest.fail(f"{error[:2000]}\nThe notebook fails when run (nbdev_test reports the same): fix it first.",
                          pytrace=False)
    problems = compare_notebook(notebook, stored, fresh_outputs[str(notebook)])
    if problems:
        pytest.fail("\n".join(problems) + f"\nThe stored outputs of {notebook.relative_to(ROOT)} are not what its code "
                    f"produces now. If the change is intended, refresh them (CONTRIBUTING.md):\n  "
                    f"{refresh_command(notebook)}", pytrace=False)


def _changed(outputs: list[dict], **data) -> list[dict]:
    return [{**o, "data": {**o["data"], **data}} if "data" in o else o for o in outputs]


def test_the_comparison_fails_on_changed_missing_and_extra_outputs_and_tolerates_pixel_noise():
    "Without running anything: the stored outputs of 04_moppa against altered copies."
    notebook = NBS / "04_moppa.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    with_figure = next(i for i, c in enumerate(cells) if any("image/png" in o.get("data", {}) for o in c.get("outputs", [])))
    with_print = next(i for i, c in enumerate(cells) if any(o.get("name") == "stdout" for o in c.get("outputs", [])))
    without = next(i for i, c in enumerate(cells) if c["cell_type"] == "code" and not c["outputs"])
    fresh = {"outputs": [c.get("outputs", []) for c in cells], "skipped": [], "error": None}
    assert compare_notebook(notebook, cells, fresh) == []

    image = pixels(next(o["data"]["image/png"] for o in cells[with_figure]["outputs"] if "data" in o))
    def png(array):
        buffer = io.BytesIO(); Image.fromarray(array.astype(np.uint8)).save(buffer, format="png")
        return base64.b64encode(buffer.getvalue()).decode()
    noisy, painted = image.copy(), image.copy()
    noisy[..., :3] = np.clip(noisy[..., :3] + np.random.default_rng(0).integers(-3, 4, noisy[..., :3].shape), 0, 255)
    painted[20:25, 30:40, :3] = 255 - painted[20:25, 30:40, :3]
    fresh["outputs"][with_figure] = _changed(cells[with_figure]["outputs"], **{"image/png": png(noisy)})
    assert compare_notebook(notebook, cells, fresh) == []                       # within the tolerance
    fresh["outputs"][with_figure] = _changed(cells[with_figure]["outputs"], **{"image/png": png(painted)})
    fresh["outputs"][with_print] = [{**o, "text": "".join(o["text"]) + "a changed line\n"} if o.get("name") == "stdout"
                                    else o for o in cells[with_print]["outputs"]]
    fresh["outputs"][without] = [{"output_type": "stream", "name": "stdout", "text": "hello\n"}]
    problems = compare_notebook(notebook, cells, fresh)
    assert len(problems) == 3, problems
    assert any(p.startswith(f"nbs/04_moppa.ipynb, cell {with_figure} (`{first_line(cells[with_figure]['source'])}`): "
                            f"displayed output 1 (image/png): 50 of ") and "rows 20-24, columns 30-39" in p for p in problems)
    assert any(f"cell {with_print} (" in p and "stdout differs" in p and "+a changed line" in p for p in problems)
    assert any(f"cell {without} (`{first_line(cells[without]['source'])}`)" in p and "(extra)" in p for p in problems)
    fresh["outputs"][with_print] = []
    assert any(f"cell {with_print} " in p and "(missing)" in p for p in compare_notebook(notebook, cells, fresh))


if __name__ == "__main__":                     # the subprocess of `fresh_outputs`: python this.py OUT.json NB...
    Path(sys.argv[1]).write_text(json.dumps(execute([Path(p) for p in sys.argv[2:]])))
