"""Copy the pipeline's generated tables into README.md between the <!-- NAME:start/end --> markers.

Run after `dvc repro`: `python scripts/update_readme.py`. Nothing in those sections is typed by hand.
"""
import re
import sys
from pathlib import Path

SECTIONS = {"results": Path("reports/default/results.md"), "bench": Path("reports/bench/bench.md"),
            "interleaved": Path("reports/bench/interleaved.md"),
            "gpu_interleaved": Path("reports/gpu/interleaved_cuda.md"), "gpu_bench": Path("reports/gpu/bench_cuda.md")}


def main() -> int:
    readme = Path("README.md")
    text = readme.read_text()
    for name, source in SECTIONS.items():
        if not source.is_file():
            print(f"missing {source}: run `dvc repro` first", file=sys.stderr)
            return 1
        body = source.read_text().strip()
        body = re.sub(r"^# .*\n+", "", body)          # the file's own title
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)   # empty or filled
        if not pattern.search(text):
            print(f"README.md has no <!-- {name}:start/end --> markers", file=sys.stderr)
            return 1
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
