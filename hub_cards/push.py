"""Uploading a saved VSM folder to the Hugging Face Hub (`vsm push`).

The model is saved first (`save_pretrained` writes weights, config, the flat remote-code modules and
`auto_map`), then the folder is uploaded with `HfApi.create_repo` + `HfApi.upload_folder`; never
`push_to_hub=True` inside `save_pretrained`, which would upload before the remote code is written
(transformers' push_to_hub uploads before a save_pretrained override runs).

What goes up is what a clean `trust_remote_code=True` load reads, plus the model card and the summary
metrics: the top-level weights, configs, tokenizer / processor files and remote-code modules, README.md,
metrics.json and train_metrics.json. Everything else stays local: sub-folders (checkpoints/, trainer/,
adapter/, overlays/, build/, *.egg-info/, __pycache__/), per-sample results (*.jsonl), logs and images.
"""

import fnmatch
import json
from pathlib import Path

# Top-level files a load reads (weights, configs, tokenizer and processor, remote code).
LOAD_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "processor_config.json",
    "preprocessor_config.json", "tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
    "vocab.*", "merges.txt", "*.model", "*.py",
)
DOC_FILES = ("README.md", "metrics.json", "train_metrics.json")
REMOTE_CODE_FILES = ("configuration_vsm.py", "modeling_vsm.py", "processing_vsm.py")
REQUIRED_FILES = ("config.json", "processor_config.json", *REMOTE_CODE_FILES)


def files_to_push(folder) -> list[str]:
    """The file names (top level of `folder`) that `vsm push` uploads, sorted."""
    folder = Path(folder)
    names = [path.name for path in folder.iterdir() if path.is_file()]
    return sorted(name for name in names
                  if name in DOC_FILES or any(fnmatch.fnmatchcase(name, pattern) for pattern in LOAD_PATTERNS))


def check_folder(folder) -> None:
    """A clear error unless `folder` is a saved VSM that loads with `trust_remote_code=True`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a saved VSM folder: missing {', '.join(missing)} "
                         "(save it with model.save_pretrained + processor.save_pretrained first)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "vsm" or "AutoModelForCausalLM" not in config.get("auto_map", {}):
        raise ValueError(f"{folder}/config.json is not a VSM config with an auto_map (model_type "
                         f"{config.get('model_type')!r}); save it with VSMForCausalLM.save_pretrained")


def push_folder(folder, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, write_card: bool = True) -> dict:
    """Uploads a saved VSM folder: `create_repo` (exist_ok), `create_branch` for a revision, `upload_folder` of
    `files_to_push(folder)`. With `write_card`, README.md is first re-rendered with `repo_id` in its usage
    snippet (`hub_cards.render_folder_card`). Returns `{"repo_id", "url", "revision", "files"}`."""
    from huggingface_hub import HfApi

    from . import render_folder_card

    folder = Path(folder)
    check_folder(folder)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    if write_card:
        (folder / "README.md").write_text(render_folder_card(folder, repo=repo_id), encoding="utf-8")
    files = files_to_push(folder)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), allow_patterns=files, repo_type="model", revision=revision,
        commit_message=commit_message or f"Upload VSM from {folder.name}",
    )
    return {"repo_id": repo_id, "url": str(repo), "revision": revision or "main", "files": files}
