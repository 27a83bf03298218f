"""The README's quick start runs as written."""
import re
from pathlib import Path


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert (tmp_path / "my_adapter" / "adapter.safetensors").is_file()
    assert namespace["count_trainable"](namespace["other"]) == 9_936


def test_update_readme_fills_empty_and_filled_sections_the_same_way(tmp_path):
    import subprocess, sys
    script = Path(__file__).parent.parent / "scripts" / "update_readme.py"
    import runpy
    sections = runpy.run_path(str(script))["SECTIONS"]        # every section the script fills, each from its own file
    for name, source in sections.items():
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text(f"# Title\n\n| {name} |\n")
    markers = "".join(f"<!-- {n}:start -->\n<!-- {n}:end -->\n" for n in sections)
    (tmp_path / "README.md").write_text("intro\n" + markers)
    for _ in range(2):                                   # first fill, then refill: same text
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
        text = (tmp_path / "README.md").read_text()
        assert "<!-- bench:start -->\n| bench |\n<!-- bench:end -->" in text and "# Title" not in text
