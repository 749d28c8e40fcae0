"""Shared fixtures: the tiny preset, its processor, batches built from the synthetic data, and a clean process."""

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from configuration_vsm import VSMConfig


@pytest.fixture(scope="session")
def tiny_processor():
    from processing_vsm import VSMProcessor

    return VSMProcessor.from_preset("tiny")


@pytest.fixture(scope="session")
def synthetic_rows():
    """A few rows of every query type from the built-in data, keyed by query type."""
    from modeling_vsm.data import load_synthetic

    rows = {}
    for row in load_synthetic("test", num_samples=120):
        rows.setdefault(row["query_type"], []).append(row)
    return rows


def processor_for_source(tiny_processor, source: str):
    """The tiny processor with the dense view of `source` ("sam" / "detector" add one), reusing its tokenizer
    (`VSMProcessor.from_preset` would train the tokenizer again)."""
    from processing_vsm import VSMImageProcessor, dense_view_settings

    config = VSMConfig.from_preset("tiny", dense_feature_source=source)
    images = tiny_processor.image_processor
    image_processor = VSMImageProcessor(image_size=images.image_size, image_mean=images.image_mean,
                                        image_std=images.image_std, **dense_view_settings(config))
    return type(tiny_processor)(image_processor=image_processor, tokenizer=tiny_processor.tokenizer,
                                num_image_tokens=config.num_image_tokens)


def make_tiny_model(seed: int = 0, **overrides):
    from modeling_vsm import VSMForCausalLM

    torch.manual_seed(seed)
    return VSMForCausalLM(VSMConfig.from_preset("tiny", **overrides))


def make_batch(processor, rows):
    from modeling_vsm.training import VSMDataCollator

    return VSMDataCollator(processor)(rows)


CLEAN_PROCESS_PRELUDE = """
import sys
sys.path.append(sys.argv[1])  # site-packages only: -S skipped the .pth files of editable installs
for name in ("configuration_vsm", "modeling_vsm", "processing_vsm"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the test would not prove anything")
"""


def run_in_clean_process(script: str, args, tmp_path, timeout: int = 300):
    """Runs `script` under `python -I -S` with torch and transformers importable but NOT this project, the way
    a user who never installed it loads a saved folder. The script reads its own arguments from `sys.argv[2:]`."""
    path = tmp_path / "clean_process.py"
    path.write_text(CLEAN_PROCESS_PRELUDE + textwrap.dedent(script))
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(path), sysconfig.get_paths()["purelib"], *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
