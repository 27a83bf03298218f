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
