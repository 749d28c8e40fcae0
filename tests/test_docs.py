"""The README and docs/: every relative link resolves, the README stays short and opens with the two commands,
nothing points outside the repository, and every ```python block of README.md runs against tiny models.

Each block runs in a fresh namespace with cwd = a temporary folder, after an explicit substitution of the
placeholders it uses (SUBSTITUTIONS) by tiny stand-ins built here."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_BYTES = 15_500
OPENING = """```bash
bash scripts/main.sh    # set up, train the tiny VSM on built-in data, evaluate it, predict once -> outputs/
bash scripts/test.sh    # set up, run the tests (pytest)
```"""
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def relative_links(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links only in prose, never in code
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, ... and anchors within the page
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_to_files_in_the_repository(path):
    broken = [t for t in relative_links(path) if not (path.parent / t).resolve().is_file()
              or ROOT not in (path.parent / t).resolve().parents]
    assert not broken, f"{path.name}: links that resolve to no file in the repository: {broken}"


def test_docs_exist_and_readme_is_short_and_opens_with_the_two_commands():
    assert {p.name for p in DOCS} >= {"design.md", "tiny-preset.md", "benchmarks.md", "data.md"}
    assert README.stat().st_size <= MAX_README_BYTES, README.stat().st_size
    text = README.read_text()
    first_block = text[text.index("```"):]
    assert first_block.startswith(OPENING), first_block[:300]
    assert text.index("```") < text.index("\n## "), "the two commands come before any section"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(path):
    assert "shared/" not in path.read_text()


# ---- the README's Python blocks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Placeholder -> path of a tiny stand-in. Built lazily: only what some block names."""
    root = tmp_path_factory.mktemp("readme")
    text = README.read_text()
    paths = {}

    # A saved tiny VSM (random weights), with an image beside it as the quick start expects.
    from processing_vsm import VSMProcessor

    folder = root / "vsm-tiny"
    make_tiny_model().save_pretrained(folder)
    VSMProcessor.from_preset("tiny").save_pretrained(folder)
    Image.new("RGB", (72, 50), (40, 40, 40)).save(folder / "example.png")
    paths["outputs/vsm-tiny"] = folder

    if "checkpoints/janus-pro-1b" in text:  # tiny Janus-Pro, SAM and OWL-ViT folders for from_components
        from test_components import save_janus, save_sam_and_owlvit

        torch.manual_seed(0)
        save_janus(root / "janus")
        save_sam_and_owlvit(root)
        paths.update({"checkpoints/janus-pro-1b": root / "janus", "checkpoints/sam-vit-base": root / "sam",
                      "checkpoints/owlvit-base-patch16": root / "owlvit"})

    if "OUTPUT_DIR/adapter" in text:  # a LoRA run of `vsm train`, 1 step
        from modeling_vsm.cli import main

        output = root / "lora-run"
        assert main(["train", "--max-steps", "1", "--batch-size", "2", "--train-samples", "4", "--no-eval",
                     "--save-steps", "0", "--trainable", "lora", "--lora-rank", "4", "--output-dir", str(output)]) == 0
        paths["OUTPUT_DIR/adapter"] = output / "adapter"
    return paths


def substitute(block: str, paths) -> str:
    for placeholder, path in sorted(paths.items(), key=lambda item: -len(item[0])):  # longest first
        block = block.replace(f'"{placeholder}', f'"{path}')  # "outputs/vsm-tiny/example.png" keeps its tail
    return block


README_BLOCKS = PYTHON_BLOCK.findall(README.read_text())


def test_the_readme_has_python_blocks():
    assert len(README_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_python_block_runs(index, stand_ins, tmp_path, monkeypatch, capsys):
    block = README_BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = substitute(block, stand_ins)
    quoted = re.findall(r'"([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)"', code)
    assert not quoted, f"block {index} names Hub ids or folders with no stand-in: {quoted}"
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
