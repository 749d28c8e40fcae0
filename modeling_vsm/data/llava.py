"""LLaVA conversations (`llava_v1_5_mix665k` style, JSON or JSONL): text-only training rows, with or without an
image."""

import json
import math
from pathlib import Path

from .reading import SkipLog, _read_json_list
from .schema import LOC_TOKEN, SEG_TOKEN, _row, _rows_to_dataset


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LLAVA_IMAGE_PLACEHOLDER = "<image>"


def _llava_messages(conversations):
    """LLaVA `conversations` -> `(messages, number of <image> placeholders)`; raises ValueError naming the problem.

    Turns must alternate user / assistant, starting with the user and ending with the assistant. The
    `<image>` placeholder is removed (the collator puts the image after the first instruction).
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("`conversations` must be a non-empty list")
    messages, placeholders = [], 0
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in LLAVA_ROLES:
            raise ValueError(f"turn {k} needs `from` in {sorted(LLAVA_ROLES)} and a string `value`")
        role = LLAVA_ROLES[turn["from"]]
        if role != ("user", "assistant")[k % 2]:
            raise ValueError(f"turn {k} is from {turn['from']!r}: turns must alternate, human first")
        text = turn["value"]
        if SEG_TOKEN in text or LOC_TOKEN in text:
            raise ValueError(f"turn {k} holds {SEG_TOKEN} or {LOC_TOKEN}, which VSM reserves for masks and boxes")
        placeholders += text.count(LLAVA_IMAGE_PLACEHOLDER)
        for placeholder in (f"{LLAVA_IMAGE_PLACEHOLDER}\n", f"\n{LLAVA_IMAGE_PLACEHOLDER}", LLAVA_IMAGE_PLACEHOLDER):
            text = text.replace(placeholder, "")
        text = text.strip()
        if not text:
            raise ValueError(f"turn {k} is empty")
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last turn is not an answer")
    return messages, placeholders


def _llava_entries(path: Path):
    """Yields `(index, entry or None, problem)` from a JSON list or a JSONL file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line), None
                except json.JSONDecodeError as error:
                    yield index, None, f"invalid JSON line ({error})"
        return
    entries = _read_json_list(path, "LLaVA file", "a JSON list of conversations")
    for index, entry in enumerate(entries):
        yield index, entry, None


def _llava_rows(path, image_dir):
    skips, num_rows, seen = SkipLog("LLaVA entry"), 0, 0
    for index, entry, problem in _llava_entries(path):
        seen += 1
        where = f"{path.name} #{index}"
        try:
            if problem:
                raise ValueError(problem)
            if not isinstance(entry, dict) or "conversations" not in entry:
                raise ValueError("missing key `conversations`")
            messages, placeholders = _llava_messages(entry["conversations"])
            image = None
            if entry.get("image") is not None:
                if not isinstance(entry["image"], str):
                    raise ValueError("`image` must be one file name (several images are not supported)")
                if placeholders > 1:
                    raise ValueError(f"{placeholders} {LLAVA_IMAGE_PLACEHOLDER} placeholders for one image")
                image_path = Path(image_dir) / entry["image"]
                if not image_path.is_file():
                    raise ValueError(f"missing image {image_path}")
                image = {"path": str(image_path), "bytes": None}  # decoded lazily
            elif placeholders:
                raise ValueError(f"{LLAVA_IMAGE_PLACEHOLDER} in the text but no `image`")
        except ValueError as error:
            skips.skip(where, str(error))
            continue
        num_rows += 1
        yield _row(
            image, None, None, messages=messages, query_type="vqa", chance_iou=math.nan, source="llava",
            sample_id=f"llava-{index}-{entry.get('id', '')}",
        )
    skips.report(path, seen)
    skips.fail_if_empty(num_rows, path, seen)


def load_llava(path, image_dir=None, streaming: bool = False):
    """Reads LLaVA conversation data (`llava_v1_5_mix665k.json` style; a JSON list or JSONL).

    Each entry: `id`, optional `image` (a path relative to `image_dir`, default the JSON's folder) and
    `conversations` (`[{"from": "human" | "gpt", "value": text}, ...]`, multi-turn, `<image>` marking
    where the image was). Entries without `image` are text-only. Rows have no masks or boxes, so they
    train on the text loss only (CE on every answer turn). Entries with a missing image, missing keys,
    unknown or non-alternating roles, several images, or `<SEG>` / `<loc>` in the text are skipped with a
    counted warning naming the file; an invalid JSON file raises.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA conversation file not found: {str(path)!r}")
    image_dir = Path(image_dir) if image_dir is not None else path.parent
    if not image_dir.is_dir():
        raise FileNotFoundError(f"LLaVA image folder not found: {str(image_dir)!r}")
    return _rows_to_dataset(_llava_rows, streaming, path=path, image_dir=image_dir)
