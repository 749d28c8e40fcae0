"""`vsm demo`: the Gradio app started on localhost and called with gradio_client."""

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
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    server = subprocess.Popen([sys.executable, "-m", "modeling_vsm.cli", "demo", "--model", str(folder), "--port", str(port),
                               "--max-new-tokens", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client, deadline = None, time.time() + STARTUP_SECONDS
        while client is None:
            assert server.poll() is None, server.stdout.read()[-2000:]
            try:
                client = client_module.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "dl"))
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
