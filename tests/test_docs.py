"""No dangling references: every relative link, anchor, file and command the docs name exists.

Reads README.md, BENCHMARKS.md, docs/*.md, and the docstrings and comments of the code (which
name files and commands too): a moved or renamed file fails here, not in a reader's terminal.
"""

import os
import re
from pathlib import Path

import pytest

from models import ROOT

MARKDOWN = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def our_code():
    """Our .py/.sh/.html files and the Makefile: not the virtual environment, not this file's own examples."""
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if d == ".ci" or not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".sh", ".html")) or name in ("Makefile", "run"):
                if name != "test_docs.py":
                    yield Path(folder) / name


SOURCES = MARKDOWN + list(our_code())

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
REPO_DIRS = ("serve/", "bench/", "docs/", "tests/", ".ci/")
# A repo file written in backticks: `serve/app.py`, `train_loop.py`, `docs/study.md`
BACKTICKED = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|sh|md|html)|(?:%s)[\w./-]*)`" % "|".join(map(re.escape, REPO_DIRS)))
# Commands: `python -m serve.predict`, `python inspect_model.py`, `bash bench/gpu_check.sh`, `uvicorn serve.app:x`
MODULE = re.compile(r"python3? -m ((?:serve|bench|tests)(?:\.\w+)*)")
SCRIPT = re.compile(r"(?:python3?|bash|accelerate launch(?: --[\w-]+(?:[ =][\w.]+)?)*) ((?:[\w-]+/)*[\w-]+\.(?:py|sh))\b")
FACTORY = re.compile(r"uvicorn ((?:serve|bench)(?:\.\w+)+):(\w+)")


def rel(path):
    return path.relative_to(ROOT).as_posix()


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(markdown_file):
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated headings."""
    seen, found = {}, set()
    in_code = False
    for line in markdown_file.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def module_exists(dotted):
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("doc", MARKDOWN, ids=rel)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {rel(path)}")
    assert not broken, f"{rel(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("source", SOURCES, ids=rel)
def test_named_files_and_commands_exist(source):
    text = source.read_text()
    missing = [f"`{name}`" for name in BACKTICKED.findall(text) if not (ROOT / name).exists()]
    missing += [f"python -m {name}" for name in MODULE.findall(text) if not module_exists(name)]
    missing += [name for name in SCRIPT.findall(text) if not (ROOT / name).is_file()]
    for module, attribute in FACTORY.findall(text):
        if not module_exists(module) or f"def {attribute}(" not in ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text():
            missing.append(f"uvicorn {module}:{attribute}")
    assert not missing, f"{rel(source)} names what does not exist: {', '.join(sorted(set(missing)))}"


def test_the_checker_sees_references():
    """The patterns really match what the docs write (a checker that matches nothing passes anything)."""
    readme = (ROOT / "README.md").read_text()
    assert len(LINK.findall(readme)) >= 5 and len(BACKTICKED.findall(readme)) >= 5
    assert slug("On GPUs: `accelerate config` and `accelerate launch`") == "on-gpus-accelerate-config-and-accelerate-launch"
    assert SCRIPT.findall("accelerate launch --mixed_precision bf16 bench/gpu_check.py run") == ["bench/gpu_check.py"]
    assert MODULE.findall("python -m serve.predict --file x") == ["serve.predict"]
    assert not module_exists("serving") and not (ROOT / "app.py").exists()  # the old names are gone


def test_readme_quotes_the_real_step():
    """The README's step (train_one_epoch's `with accelerator.accumulate` block) is train_loop.py's, verbatim."""
    readme, code = (ROOT / "README.md").read_text(), (ROOT / "train_loop.py").read_text()
    quoted = re.search(r"```python\n(with accelerator\.accumulate\(model\):\n.*?)```", readme, re.DOTALL)
    assert quoted, "README.md quotes no `with accelerator.accumulate(model):` block"
    indented = "".join(" " * 8 + line if line.strip() else line for line in quoted.group(1).splitlines(keepends=True))
    assert indented in code, "README.md's step differs from train_one_epoch's: quote it again"


def test_readme_is_a_tutorial_size():
    assert len((ROOT / "README.md").read_bytes()) <= 20_000
