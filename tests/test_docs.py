"""The README and docs/ show commands that exist with the flags shown, links that resolve, and a
configuration page that matches the config classes."""

import re
from pathlib import Path

import pytest

from tests.doc_commands import (
    check_mentioned_command,
    check_module_command,
    code_blocks,
    commands_in,
)

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_in_code_blocks_run_with_their_flags(page):
    for command in commands_in(code_blocks(page.read_text())):
        check_module_command(command)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_named_in_the_text_exist_with_their_flags(page):
    for command in commands_in(page.read_text()):
        check_mentioned_command(command)
    for script in re.findall(r"benchmarks/[\w_]+\.py", page.read_text()):
        assert (ROOT / script).exists(), script
    for name in re.findall(r"python benchmarks/([\w_]+\.py)", page.read_text()):
        assert (ROOT / "benchmarks" / name).exists(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks[:2] == [
        "bash scripts/setup.sh && .venv/bin/python -m mixcl_ray.tune\n",
        "bash .ci/run\n",
    ]
    assert len(text.splitlines()) <= 150
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/setup.sh" in ci and "pytest" in ci


def test_the_configuration_page_is_generated_from_the_config_classes():
    from mixcl_ray.config.docs import markdown

    page = (ROOT / "docs/configuration.md").read_text()
    assert page == markdown(), "regenerate: python -m mixcl_ray.config.docs > docs/configuration.md"
    rows = [r for r in page.splitlines() if r.startswith("| `")]
    assert rows and all(not r.rstrip().endswith("|  |") for r in rows), "a setting has no comment"
    for name in ("optim.lr", "patches.patch_size", "loss.l_id", "min_patches_per_epoch"):
        assert f"| `{name}` |" in page
