"""The documentation follows the method registry: every registered method has its page and its rows."""

from pathlib import Path

import pytest

from robust_sft import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_its_docs_page_and_rows(name):
    method = METHODS[name]
    page = ROOT / "docs" / method.docs
    assert page.is_file(), f"{method.docs} is missing"
    trainer = method.trainer.rpartition(":")[2]
    assert trainer in page.read_text()
    for listing in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        text = listing.read_text()
        assert f"`{trainer}`" in text, f"{listing.name} has no row for {trainer}"
        if method.paper is not None:
            assert method.paper.url in text, f"{listing.name} does not link {method.paper.url}"
    assert method.docs in (ROOT / "mkdocs.yml").read_text()
