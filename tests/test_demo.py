"""`vsm demo`: the Gradio app started on localhost, called with gradio_client and used in a headless Chromium."""

import os
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import make_tiny_model

STARTUP_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver


def start_demo(folder, tmp_path):
    """`vsm demo` on a free port: (server process, url)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    server = subprocess.Popen([sys.executable, "-m", "modeling_vsm.cli", "demo", "--model", str(folder), "--port", str(port),
                               "--max-new-tokens", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return server, f"http://127.0.0.1:{port}/"


def test_gradio_is_not_imported_with_the_package():
    code = "import sys, modeling_vsm, modeling_vsm.cli, modeling_vsm.demo; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_answer_rejects_missing_inputs(tiny_processor):
    from modeling_vsm.demo import answer

    with pytest.raises(ValueError, match="Upload an image"):
        answer(None, tiny_processor, None, "segment it", 4)
    with pytest.raises(ValueError, match="Type an instruction"):
        answer(None, tiny_processor, Image.new("RGB", (8, 8)), "  ", 4)


def test_demo_serves_predictions(tiny_processor, tmp_path):
    pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    folder = tmp_path / "model"
    make_tiny_model().save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image_path)
    server, url = start_demo(folder, tmp_path)
    try:
        client, deadline = None, time.time() + STARTUP_SECONDS
        while client is None:
            assert server.poll() is None, server.stdout.read()[-2000:]
            try:
                client = client_module.Client(url, verbose=False, download_files=str(tmp_path / "dl"))
            except Exception:
                assert time.time() < deadline, "the demo did not start"
                time.sleep(1)
        text, overlay_path, details = client.predict(client_module.handle_file(str(image_path)), "Please segment the red shape.",
                                                     api_name="/predict")
        assert isinstance(text, str)
        assert set(details) == {"boxes", "scores", "mask_areas"} and len(details["boxes"]) == len(details["scores"])
        overlay = Image.open(overlay_path)
        assert overlay.width / overlay.height == pytest.approx(40 / 30, rel=0.05) and overlay.width >= 256  # upscaled
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_description_shows_the_special_tokens_as_text(tiny_processor):
    """Gradio renders the description as HTML: `<SEG>` must arrive escaped, or a browser takes it for a tag."""
    pytest.importorskip("gradio")
    from modeling_vsm.demo import DESCRIPTION, build_demo

    demo = build_demo(make_tiny_model(), tiny_processor)
    assert "<SEG>" in DESCRIPTION and "<SEG>" not in demo.description
    assert "&lt;SEG&gt;" in demo.description and "&lt;loc&gt;" in demo.description


def test_the_demo_in_a_browser_shows_the_answer_and_the_overlay(tiny_processor, tmp_path):
    """The page as a person sees it (headless Chromium, Selenium): the description reads `<SEG>` / `<loc>` as text, and
    uploading an image and submitting an instruction shows the model's answer and an overlay image."""
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them as root)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from modeling_vsm.demo import answer

    model = make_tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image_path)
    instruction = "Please segment the red shape."
    expected_text = answer(model.eval(), tiny_processor, Image.open(image_path), instruction, 4)[0]

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    server, url = start_demo(folder, tmp_path)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            assert server.poll() is None, server.stdout.read()[-2000:]
            try:
                driver.get(url)
                break
            except Exception:
                assert time.time() < deadline, "the demo did not start"
                time.sleep(1)
        wait = WebDriverWait(driver, STARTUP_SECONDS)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))[0]
        page_text = driver.find_element(By.TAG_NAME, "body").text
        assert "each <SEG> in the answer becomes a mask, each <loc> a box." in page_text
        upload.send_keys(str(image_path))
        instruction_box, _ = driver.find_elements(By.CSS_SELECTOR, "textarea")
        instruction_box.clear()
        instruction_box.send_keys(instruction)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img[src*='gradio_api/file']")) >= 1)  # the upload
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Submit").click()
        answer_box = driver.find_elements(By.CSS_SELECTOR, "textarea")[1]
        wait.until(lambda d: answer_box.get_attribute("value"))
        assert answer_box.get_attribute("value") == expected_text
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img[src*='gradio_api/file']")) >= 2)  # + the overlay
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
