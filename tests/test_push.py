"""`vsm push`: the Hub API is patched to record calls and files; the recorded folder loads in a clean process."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from conftest import make_tiny_model, run_in_clean_process
from modeling_vsm.cli import main

LOAD_FILES = {"config.json", "generation_config.json", "model.safetensors", "configuration_vsm.py", "modeling_vsm.py",
              "processing_vsm.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
DOC_FILES = {"README.md", "metrics.json", "train_metrics.json"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Records HfApi calls; `upload_folder` copies what huggingface_hub's own pattern filter lets through."""
    calls, remote = [], tmp_path / "remote"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        files = [p.relative_to(folder_path).as_posix() for p in sorted(Path(folder_path).rglob("*")) if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder_path) / name, remote / name)

    for name, fake in (("create_repo", create_repo), ("create_branch", create_branch), ("upload_folder", upload_folder)):
        monkeypatch.setattr(HfApi, name, fake)
    return calls, remote


def _trained_looking_folder(tmp_path, processor):
    """A saved VSM with what `vsm train` / `vsm eval` leave around it."""
    folder = tmp_path / "run"
    model = make_tiny_model(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"data": "synthetic", "split": "validation", "giou": 0.42,
                                                     "ciou": 0.4, "num_samples": 5, "seg_emission_rate": 1.0}))
    (folder / "train_metrics.json").write_text(json.dumps({"data": "synthetic", "train_steps": 7, "trainable": "full"}))
    (folder / "metrics.samples.jsonl").write_text("{}\n")
    (folder / "train_log.json").write_text("{}")
    (folder / "example.png").write_bytes(b"png")
    for junk in ("checkpoints/checkpoint-7/model.safetensors", "adapter/adapter_model.safetensors", "overlays/best_00.png",
                 "build/lib/modeling_vsm.py", "vsm.egg-info/PKG-INFO", "__pycache__/modeling_vsm.cpython-311.pyc"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"junk")
    return folder, model


def test_push_uploads_exactly_the_loadable_folder(hub, tmp_path, tiny_processor):
    calls, remote = hub
    folder, model = _trained_looking_folder(tmp_path, tiny_processor)
    assert main(["push", "--model", str(folder), "--repo-id", "org/vsm-tiny", "--private", "--revision", "v1",
                 "--commit-message", "first"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["branch"] == "v1"
    assert calls[2][2]["revision"] == "v1" and calls[2][2]["commit_message"] == "first"
    pushed = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert pushed == LOAD_FILES | DOC_FILES
    card = ModelCard.load(remote / "README.md")
    assert 'from_pretrained("org/vsm-tiny", trust_remote_code=True)' in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["giou"] == 0.42
    assert "- steps: `7`" in card.text

    # The pushed files alone load in a process that never installed this project, with the same logits.
    input_ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
    torch.save({"input_ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    run_in_clean_process(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        folder, expected = sys.argv[2], torch.load(sys.argv[3], weights_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        assert torch.allclose(logits, expected["logits"], atol=1e-5), (logits - expected["logits"]).abs().max()
        """,
        [remote, tmp_path / "expected.pt"], tmp_path,
    )


def test_push_without_card_keeps_readme(hub, tmp_path, tiny_processor):
    calls, remote = hub
    folder, _ = _trained_looking_folder(tmp_path, tiny_processor)
    (folder / "README.md").write_text("my own card\n")
    assert main(["push", "--model", str(folder), "--repo-id", "org/x", "--no-card"]) == 0
    assert (remote / "README.md").read_text() == "my own card\n"
    assert "create_branch" not in [c[0] for c in calls] and calls[-1][2]["revision"] is None


@pytest.mark.parametrize("make_args, message", [
    (lambda folder: ["--model", str(folder / "nope"), "--repo-id", "org/x"], "is not a folder"),
    (lambda folder: ["--model", str(folder.parent), "--repo-id", "org/x"], "missing config.json"),
    (lambda folder: ["--model", str(folder), "--repo-id", "no-org"], "ORG/NAME"),
])
def test_push_errors_before_any_upload(hub, tmp_path, tiny_processor, capsys, make_args, message):
    calls, _ = hub
    folder, _ = _trained_looking_folder(tmp_path, tiny_processor)
    assert main(["push", *make_args(folder)]) == 2
    assert message in capsys.readouterr().err and not calls


def test_save_pretrained_refuses_push_to_hub(tmp_path):
    with pytest.raises(ValueError, match="vsm push"):
        make_tiny_model().save_pretrained(tmp_path / "x", push_to_hub=True)
