"""The docs say what the code has: every option the configuration doc lists is a config file and every
config file is listed; every relative link of the README and docs/ points to a file that exists; the
README stays a front door."""

import re

from fineclip.cli import CONFIG_DIR

ROOT = CONFIG_DIR.parent
ROW = re.compile(r"^\| `(\+?[\w/]+)=` \| (.+?) \|")


def documented_options() -> dict[str, set[str]]:
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1).lstrip("+")] = set(re.findall(r"`([\w]+)`", match.group(2)))
    return rows


def config_options() -> dict[str, set[str]]:
    groups = {}
    for path in CONFIG_DIR.rglob("*.yaml"):
        group = path.parent.relative_to(CONFIG_DIR).as_posix()
        if group != ".":
            groups.setdefault(group, set()).add(path.stem)
    return groups


def test_the_configuration_doc_lists_exactly_the_config_files():
    documented, present = documented_options(), config_options()
    assert set(documented) == set(present), (sorted(set(documented) ^ set(present)))
    for group, options in present.items():
        assert documented[group] == options, (group, sorted(documented[group] ^ options))


def test_the_checker_reads_the_table():
    assert "clipself" in documented_options()["method"] and "slurm" in documented_options()["hydra/launcher"]


def test_every_relative_link_resolves():
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert ". .venv/bin/activate && pytest -q" in readme  # the test command that .ci/run calls
    assert ". .venv/bin/activate && pytest -q" in (ROOT / ".ci" / "run").read_text()
