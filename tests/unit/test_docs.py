"""The docs cannot drift: the recipe reference is what the schema says now, and every relative link resolves.

docs/recipe-reference.md is written by scripts/recipe_reference.py from finetune/recipe/; after changing a recipe
key, run `python scripts/recipe_reference.py`. The links of README.md and docs/*.md must name files that exist, and
every docs page is in mkdocs.yml's nav (`mkdocs build --strict` checks the rest of the site).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scripts import recipe_reference

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_recipe_reference_is_what_the_schema_says():
    committed = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    assert committed == recipe_reference.render(), (
        "docs/recipe-reference.md is out of date with finetune/recipe/: run python scripts/recipe_reference.py")


def test_recipe_reference_names_every_key():
    text = recipe_reference.render()
    for section in ("model", "data", "train", "eval", "tune", "export", "serve"):
        assert f"## `{section}`" in text
    for key in ("train.lora.r", "data.sources.N.path", "data.clean.max_tokens", "export.fit_gb", "serve.quant",
                "tune.space.<key>.low", "train.preference.beta"):
        assert f"| `{key}` |" in text, key


def relative_links(page: Path) -> list[str]:
    """Link and image targets that point into the repository (not URLs, not anchors of the page itself)."""
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_that_exist(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_readme_links_the_docs():
    linked = {Path(t).name for t in relative_links(REPO / "README.md")}
    assert {"getting-started.md", "multi-gpu.md", "recipe-reference.md", "models.md"} <= linked
    assert "quickstart-quantization.png" in {Path(t).name for t in relative_links(DOCS / "export.md")}


def test_every_docs_page_is_in_the_nav():
    def pages(nav):
        for item in nav:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (pages(value) if isinstance(value, list) else [value])

    nav = set(pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]))
    on_disk = {p.name for p in DOCS.glob("*.md")}
    assert on_disk == nav, f"in docs/ but not in the nav: {on_disk - nav}; in the nav but not in docs/: {nav - on_disk}"


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`, in-process: a broken link, an anchor that is gone or a page missing from the nav
    fails the build."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(REPO / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    build(config)
    assert (tmp_path / "site" / "index.html").is_file()
