"""The validate stage's Data Docs open complete in Chromium with every internet request refused,
as on a hospital network without internet (Debian's Chromium through Playwright, as the page's test)."""

from __future__ import annotations

import pytest

from fracture.validation import validate
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_validation import clean_manifest, quirky, vparams  # noqa: F401 - a manifest with soft and hard findings

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")

pytestmark = pytest.mark.integration


def test_data_docs_render_their_tables_offline(tmp_path, quirky, vparams):  # noqa: F811
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM}; install it with `make browser`")
    manifest, _ = quirky
    validate(manifest, vparams, tmp_path / "gx")
    index = tmp_path / "gx" / "data_docs" / "index.html"

    refused: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()

            def offline(route):
                if route.request.url.startswith(("http://", "https://")):
                    refused.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            context.route("**/*", offline)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(index.as_uri())
            # bootstrap-table fills the index's table of validation results from its data.
            page.wait_for_function("document.querySelectorAll('table tbody tr').length >= 2", timeout=30_000)
            rows = page.locator("table tbody tr").all_inner_texts()
            font = page.evaluate("getComputedStyle(document.body).fontFamily")
        finally:
            browser.close()

    assert refused == [] and errors == []
    assert any("hard_rules_fail_the_validate_stage" in r for r in rows)
    assert any("soft_rules_reported_and_handled_by_policies" in r for r in rows)
    assert "Times New Roman" not in font  # Bootstrap's styles applied
