"""docs/architecture.md's package table matches the code: every package it names exists, and every package of
diffrl and rewards is in it."""

import re

from tests.conftest import REPO_ROOT


def _documented() -> set[str]:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("<!-- packages -->")[1].split("<!-- /packages -->")[0]
    return set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M))


def _packages() -> set[str]:
    found = set()
    for root in ("diffrl", "rewards"):
        for init in (REPO_ROOT / root).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(REPO_ROOT).parts))
    return found


def test_every_package_is_documented_and_every_documented_package_exists():
    documented, packages = _documented(), _packages()
    assert documented, "docs/architecture.md lost its package table"
    assert sorted(packages - documented) == [], "packages missing from docs/architecture.md"
    assert sorted(documented - packages) == [], "docs/architecture.md names packages that do not exist"


def test_every_module_named_in_the_package_table_exists():
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("<!-- packages -->")[1].split("<!-- /packages -->")[0]
    missing = []
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        package = re.match(r"^\| `([\w.]+)` \|", row).group(1)
        folder = REPO_ROOT.joinpath(*package.split("."))
        for module in re.findall(r"`(\w+)\.py`", row):
            if not (folder / f"{module}.py").is_file():
                missing.append(f"{package}/{module}.py")
    assert missing == []


def test_every_shipped_file_a_message_or_doc_names_exists():
    """A path under assets/, configs/, docs/ or scripts/ named in the code or the docs (an error message's example,
    a docstring, a link) is a file of the repository: no advice that points nowhere. (The public trainers'
    scripts/train_*.py that the fidelity notes cite are the authors' files, not ours; prompt files a published
    config asks the user to bring are the config's own business, checked when it loads.)"""
    pattern = re.compile(r"(?<![\w/.{])((?:assets|configs|docs|scripts)/[\w./-]+\.(?:jsonl|txt|yaml|json|md|py|png))")
    sources = [*(REPO_ROOT / "diffrl").rglob("*.py"), *(REPO_ROOT / "rewards").rglob("*.py"),
               *(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md"]
    missing = set()
    for source in sources:
        for name in pattern.findall(source.read_text(encoding="utf-8")):
            if name.startswith("scripts/train_"):
                continue
            if not (REPO_ROOT / name).exists() and not (source.parent / name).exists():
                missing.add(f"{source.relative_to(REPO_ROOT)}: {name}")
    assert sorted(missing) == []
