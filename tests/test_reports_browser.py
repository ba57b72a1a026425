"""Every report page opened in a real headless browser (Debian's chromium, driven by Playwright): every picture
loads, and every word of every prompt is in the page's text. Skipped where no browser is installed, unless
P2P_REQUIRE_BROWSER is set (CI sets it, so there a missing browser is a failure)."""

import re

import numpy as np
from PIL import Image

from prompt2prompt.cli import main


def check_page(browser, html, prompts):
    page = browser.new_page()
    try:
        page.goto(html.resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert images and all(ok and width > 0 for ok, width, _ in images), images
        text = page.inner_text("body")
        for prompt in prompts:
            for word in re.findall(r"\w+", prompt):
                assert word in text, (word, html)
        return text
    finally:
        page.close()


def test_every_report_page_renders(browser, sd1_folder, tmp_path):
    model = ["--model", str(sd1_folder), "--steps", "3", "--quiet"]
    src, tgt = "a red circle and a blue square", "a red circle and a blue cross"
    assert main(["attend", src, "--out", str(tmp_path / "attend"), *model]) == 0
    check_page(browser, tmp_path / "attend" / "index.html", [src])
    assert main(["edit", src, tgt, "a green circle and a blue square", "--blend", "square", "cross",
                 "--out", str(tmp_path / "edit"), *model]) == 0
    check_page(browser, tmp_path / "edit" / "index.html", [src, tgt])
    assert main(["swap-analysis", src, tgt, "--out", str(tmp_path / "swap"), *model]) == 0
    text = check_page(browser, tmp_path / "swap" / "index.html", [src, tgt])
    assert "drift" in text and "with attention control it keeps the source's layout" not in text
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    inv = tmp_path / "inv.safetensors"
    assert main(["invert", str(image), src, "--method", "ddim", "--out", str(inv), *model]) == 0
    assert main(["edit", "--from", str(inv), src, tgt, "--out", str(tmp_path / "real"), "--quiet"]) == 0  # its model
    text = check_page(browser, tmp_path / "real" / "index.html", [src, tgt])
    assert "edit of a real image" in text and "reconstruction vs input" in text
    assert main(["demo", "--quick", "--model", str(sd1_folder), "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    check_page(browser, tmp_path / "demo" / "index.html", ["a red circle and a blue square"])
