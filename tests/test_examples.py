"""Every example in examples/ runs, on the tiny preset and a few steps."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model
from modeling_vsm.data import export_reasonseg, load_synthetic
from test_components import components  # noqa: F401  (tiny Janus-Pro, SAM and OWL-ViT folders)

EXAMPLES = Path(__file__).parent.parent / "examples"
BIN = Path(sys.executable).parent


def run_example(*command, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VSM=str(BIN / "vsm"))
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_processor):
    folder = tmp_path_factory.mktemp("examples") / "tiny"
    make_tiny_model().save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def test_quick_start(saved_tiny, tmp_path):
    out = run_example(sys.executable, EXAMPLES / "quick_start.py", "--model", saved_tiny, "--overlay", tmp_path / "o.png",
                      cwd=tmp_path)
    assert "answer:" in out and "masks: (" in out and (tmp_path / "o.png").is_file()


def test_evaluate_model_matches_the_evaluate_module(saved_tiny, tmp_path):
    out = run_example(sys.executable, EXAMPLES / "evaluate_model.py", "--model", saved_tiny, "--num-samples", "6",
                      "--batch-size", "3", cwd=tmp_path)
    summary = json.loads(out[: out.index("evaluate module:")])
    module = ast.literal_eval(out.split("evaluate module:")[1].strip())  # a printed dict of floats
    assert module["num_masks"] == summary["num_samples"] > 0
    assert module["giou"] == pytest.approx(summary["giou"]) and module["ciou"] == pytest.approx(summary["ciou"])


def test_finetune_reasonseg_lora(saved_tiny, tmp_path):
    data = tmp_path / "ReasonSeg"
    export_reasonseg(load_synthetic("train", num_samples=6), data / "train")
    export_reasonseg(load_synthetic("validation", num_samples=6), data / "val")
    out_dir = tmp_path / "finetuned"
    run_example("bash", EXAMPLES / "finetune_reasonseg_lora.sh", saved_tiny, data, out_dir, "--max-steps", "2",
                "--batch-size", "2", "--save-steps", "0", cwd=tmp_path)
    assert (out_dir / "adapter").is_dir() and (out_dir / "model.safetensors").is_file()
    every_query = json.loads((out_dir / "metrics.json").read_text())
    lisa = json.loads((out_dir / "eval_val_lisa" / "metrics.json").read_text())
    assert lisa["one_query_per_image"] and 0 < lisa["num_samples"] <= every_query["num_samples"]
    assert "- trainable: `lora`" in (out_dir / "README.md").read_text()


def test_build_from_components(components, tmp_path):  # noqa: F811
    out_dir = tmp_path / "built"
    out = run_example("bash", EXAMPLES / "build_from_components.sh", out_dir, components / "janus", components / "sam",
                      components / "owlvit", "shared", cwd=tmp_path)
    assert "answer:" in out
    card = (out_dir / "README.md").read_text()
    assert f"| vision tower | {components / 'janus'} |" in card and "not trained yet" in card
