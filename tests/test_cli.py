"""The `vsm` command line end to end on a few steps, and its one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modeling_vsm.data import rle_decode

VSM = [sys.executable, "-m", "modeling_vsm.cli"]


def run_vsm(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([*VSM, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    result = run_vsm("train", "--preset", "tiny", "--data", "synthetic", "--output-dir", str(folder),
                     "--max-steps", "4", "--batch-size", "4", "--train-samples", "40", "--eval-samples", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_train_leaves_checkpoint_metrics_and_overlays(trained_folder):
    assert (trained_folder / "model.safetensors").is_file() and (trained_folder / "processor_config.json").is_file()
    metrics = json.loads((trained_folder / "metrics.json").read_text())
    for key in ("giou", "ciou", "num_samples", "seg_emission_rate", "chance_iou", "per_type", "swap_iou"):
        assert key in metrics
    assert metrics["num_samples"] == sum(1 for line in open(trained_folder / "metrics.samples.jsonl") if '"giou"' in line)
    overlays = list((trained_folder / "overlays").glob("*.png"))
    assert overlays and Image.open(overlays[0]).size[0] >= 256
    card = (trained_folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| gIoU |" in card and "trust_remote_code=True" in card
    log = json.loads((trained_folder / "train_log.json").read_text())
    logged = [entry for entry in log["log_history"] if "loss" in entry]
    assert logged and all(part in logged[0] for part in ("ce_loss", "mask_bce_loss", "mask_dice_loss", "det_loss"))


def test_eval_matches_the_training_run(trained_folder, tmp_path):
    output = tmp_path / "eval" / "metrics.json"
    result = run_vsm("eval", "--model", str(trained_folder), "--data", "synthetic", "--split", "validation",
                     "--num-samples", "24", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    again, during_training = json.loads(output.read_text()), json.loads((trained_folder / "metrics.json").read_text())
    for key in ("giou", "ciou", "num_samples", "seg_emission_rate", "swap_iou"):
        assert again[key] == pytest.approx(during_training[key])
    assert again == during_training  # the same code path: every number, per type and per phrase / sentence


def test_predict_writes_json_and_overlay(trained_folder, tmp_path):
    image_path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image_path)
    result = run_vsm("predict", "--model", str(trained_folder), "--image", str(image_path), "--prompt",
                     "Please segment the red shape.", "--output", str(tmp_path / "out.json"),
                     "--overlay", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads((tmp_path / "out.json").read_text())
    assert set(payload) == {"text", "masks", "boxes", "scores"}
    for mask in payload["masks"]:
        decoded = rle_decode(mask["rle"])  # COCO RLE with compressed counts
        assert mask["rle"]["size"] == [48, 80] and decoded.shape == (48, 80) and decoded.sum() == mask["area"]
    assert Image.open(tmp_path / "out.png").size == (80 * 4, 48 * 4)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, model: ["predict", "--model", str(tmp / "missing"), "--image", "x.png", "--prompt", "hi"],
         "is not a saved VSM folder"),
        (lambda tmp, model: ["predict", "--model", str(model), "--image", str(tmp / "nope.png"), "--prompt", "hi"],
         "does not exist"),
        (lambda tmp, model: ["predict", "--model", str(model), "--image", str(tmp / "corrupt.png"), "--prompt", "hi"],
         "corrupt.png"),
        (lambda tmp, model: ["eval", "--model", str(model), "--data", "nosuchdata", "--output", str(tmp / "m.json")],
         "nosuchdata"),
    ],
)
def test_errors_are_one_line(make_args, message, trained_folder, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    result = run_vsm(*make_args(tmp_path, trained_folder))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_readme_python_snippet_runs(trained_folder, tmp_path):
    """The usage snippet in the README really runs, on a saved folder loaded with trust_remote_code."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    Image.new("RGB", (72, 50), (40, 40, 40)).save(trained_folder / "example.png")
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("outputs/vsm-tiny", str(trained_folder)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([" in result.stdout and ", 50, 72])" in result.stdout
