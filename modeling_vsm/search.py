"""Visual search (SEAL / V*, Wu & Xie 2023, `VisualSearch/visual_search.py`): find a small target in a large image
by a best-first search over sub-images, guided by the VSM's own cues.

Each visited patch gets one `<loc>` question ("Please locate the {target} in this image."): a box whose score is
above `confidence_high` ends the search. Otherwise, unless the patch is a leaf (short side <= `smallest_size`), its
heatmap is the target cue (the `<loc>` / `<SEG>` mask logits clamped at 0, when their maximum clears a threshold
that decays with depth) or else the context cue (the model is asked where the target most likely is, and the phrase
it answers is located instead). The patch is split into 4 sub-patches, each scored by the heatmap mass it holds in
the patch and every ancestor (weighted 1 / 4^level), and pushed on ONE priority queue over all levels. When no patch
clears `confidence_high`, the best box seen wins; the search succeeded if its score is >= `confidence_low`. When the
whole image already holds the target, every box above `confidence_high` is returned (SEAL: all instances).

Deviations from the original, for speed (the same answers where the model answers the template):
- a patch's box, score and target cue come from ONE teacher-forced forward of the answer template ("Sure, [LOC]."
  for SEAL), not from a generated answer; the 4 sub-patches of an expanded patch are scored in one batched forward
  (`batch_children=False` scores one patch per call: the same path and box, `tests/test_search.py`);
- the context question is generated with the KV cache; nothing assumes CUDA;
- SEAL's detector (DETR-like) gives one box per instance; a VSM's `<loc>` gives one per image patch, so the root's
  boxes above `confidence_high` are de-duplicated (greedy non-maximum suppression at `boxes_nms_iou`).

One addition, off by default: `verify_zoom`. A model that sees a small thing at a few pixels takes a lookalike for
the target (a red square for "the red circle"). With `verify_zoom=z`, every distinct box above `confidence_high` in
a patch is looked at again, all in one batched forward, in a square crop z times its long side around it (at least
the model's input size, and only where that crop is smaller than the patch): only the boxes that score above
`confidence_high` there too end the search, with their box in the crop; when none does, the search goes on as if
the patch had found nothing above the threshold.
"""

import heapq
import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from processing_vsm.processing_vsm import boxes_to_original

from .data.highres import LEAF_SIZE_SCALE, SEARCH_LOC_ANSWER, SEARCH_LOCATE_TEMPLATE, SEARCH_SEG_ANSWER, leaf_side, split_patch
from .evaluation import prompt_text
from .metrics import box_iou
from .training import attach_image, with_processor_tokens

CONTEXT_ANSWER_MARK = "most likely to appear"
PATH_COLOURS = ((64, 160, 255), (64, 220, 120), (255, 200, 40), (200, 90, 255))
FOUND_COLOUR = (255, 64, 64)
ZOOM_COLOUR = (255, 255, 255)
LEADING_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
LEADING_WORDS = re.compile(r"^(?:the|a|an|in|on|at|near|inside|around|of|to|be|is|are|probably|likely)\s+", re.IGNORECASE)


@dataclass
class SearchSettings:
    """SEAL's thresholds and templates (its `visual_search.py` defaults)."""

    confidence_high: float = 0.5
    confidence_low: float = 0.3
    target_cue_threshold: float = 6.0
    target_cue_threshold_decay: float = 0.7
    target_cue_threshold_minimum: float = 3.0
    minimum_size_scale: float = LEAF_SIZE_SCALE
    minimum_size: int | None = None  # None: 224, or 2x the model's input for inputs smaller than 112
    locate_template: str = SEARCH_LOCATE_TEMPLATE
    context_template: str = ("According to the common sense knowledge and possible visual cues, what is the most "
                             "likely location of the {} in the image?")
    context_max_new_tokens: int = 32
    boxes_nms_iou: float = 0.5  # VSM's, not SEAL's: one root box per instance (module docstring)
    batch_children: bool = True
    # VSM's, not SEAL's (None: SEAL's stop): a box above `confidence_high` is looked at again in a square crop this
    # many times its long side, and ends the search only if it scores above `confidence_high` there too.
    verify_zoom: float | None = None

    def __post_init__(self):
        if self.verify_zoom is not None and not 1 <= self.verify_zoom < math.inf:
            raise ValueError(f"verify_zoom (--verify-zoom) is how many times its size a box is looked at again: a number "
                             f">= 1, or None (left out) for SEAL's stop; got {self.verify_zoom}.")


@dataclass
class Patch:
    """A visited or queued sub-image: `box` (x0, y0, x1, y1) in full-image pixels, its depth (root 1), its parent's
    index in the path, and, once detected, its best box (full-image pixels), score and heatmap (h, w) in [0, 1]."""

    box: tuple
    level: int
    parent: int | None = None
    priority: float = 0.0
    score: float | None = None
    found_box: tuple | None = None
    heatmap: np.ndarray | None = None
    cue: str = "leaf"
    zoom_checks: list | None = None  # with `verify_zoom`: [{"crop", "box", "score"}] of the boxes looked at again
    confirmed: list | None = None  # with `verify_zoom`: the boxes that passed, [{"box", "score"}] best first

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def distinct_boxes(scores: np.ndarray, boxes: np.ndarray, threshold: float, nms_iou: float) -> list[dict]:
    """The boxes (P, 4) xyxy whose score (P,) is above `threshold`, best first, each kept only if its IoU with every
    box kept before it is <= `nms_iou` (greedy non-maximum suppression): `[{"box", "score"}, ...]`."""
    kept = []
    for index in np.argsort(-scores, kind="stable"):
        if scores[index] <= threshold:
            break
        if all(box_iou(boxes[index], np.asarray(other["box"]))[0, 0] <= nms_iou for other in kept):
            kept.append({"box": [round(float(v), 2) for v in boxes[index]], "score": round(float(scores[index]), 4)})
    return kept


def normalised(heatmap: np.ndarray) -> np.ndarray:
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def context_phrase(answer: str, target: str) -> str:
    """The place the model named for the target: the text after "most likely to appear" (SEAL's question), without
    the target, a final full stop or leading articles and prepositions; spaCy's noun chunk where spaCy is installed."""
    phrase = answer.split(CONTEXT_ANSWER_MARK)[-1].strip().rstrip(".").split(target)[-1].strip()
    try:
        import spacy

        chunks = list(spacy.load("en_core_web_sm")(phrase).noun_chunks)
        if len(chunks) == 1:
            return chunks[0].text
    except (ImportError, OSError):  # spaCy or its English model not installed: the plain fallback
        pass
    while LEADING_WORDS.match(phrase):
        phrase = LEADING_WORDS.sub("", phrase, count=1)
    return phrase


class VisualSearch:
    """One search: the model, its processor and the settings; `run(image, target)` returns SEAL's result."""

    def __init__(self, model, processor, settings: SearchSettings):
        if not model.config.has_box_heads:
            raise ValueError("This model has no box heads (no <loc> token, e.g. a converted LISA): visual search needs a "
                             "model that answers with a box (SEAL's [LOC], or a VSM with <loc>).")
        self.model, self.processor, self.settings = model, processor, settings
        self.num_calls = 0
        loc, seg = processor.loc_token, processor.seg_token
        # The answers a patch is read with: SEAL's one token gives the box and the cue; otherwise a `<loc>` answer
        # gives the box and a `<SEG>` answer the cue (two rows of the same batch).
        self.answers = ["Sure, <loc>."] if processor.loc_token_id == processor.seg_token_id else [SEARCH_LOC_ANSWER, SEARCH_SEG_ANSWER]
        self.answers = [answer.replace("<loc>", loc).replace("<SEG>", seg) for answer in self.answers]

    def smallest_size(self, width: int, height: int) -> int:
        return leaf_side(width, height, self.processor.image_processor.image_size, self.settings.minimum_size,
                         self.settings.minimum_size_scale)

    @torch.no_grad()
    def locate(self, image: Image.Image, boxes: list, query: str) -> list[dict]:
        """One batched, teacher-forced forward over the crops `boxes` of `image` answering "locate {query}": per crop
        the best box (full-image pixels), its score, every patch's box and score (`patch_boxes` (P, 4) full-image
        pixels, `patch_scores` (P,)) and the cue's mask logits clamped at 0, at the crop's size."""
        crops = [image.crop(box) for box in boxes]
        question = [{"role": "user", "content": self.settings.locate_template.format(query)}]
        texts = []
        for answer in self.answers:
            messages = attach_image(with_processor_tokens(question + [{"role": "assistant", "content": answer}],
                                                          self.processor), self.processor)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
        rows = [(crop, text) for crop in crops for text in texts]  # each crop's answers side by side
        inputs = self.processor(images=[crop for crop, _ in rows], text=[text for _, text in rows], padding=True,
                                return_tensors="pt")
        sizes = inputs.pop("original_sizes").tolist()
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        outputs = self.model(**inputs, use_cache=False)
        self.num_calls += 1
        results, per_crop = [], len(texts)
        frame = self.processor.image_processor.prediction_frame
        for index, box in enumerate(boxes):
            box_row, cue_row = index * per_crop, index * per_crop + per_crop - 1
            height, width = sizes[box_row]
            scores = outputs.box_scores[box_row]
            offset = torch.tensor([box[0], box[1], box[0], box[1]], dtype=torch.float32)
            crop_boxes = boxes_to_original(outputs.pred_boxes[box_row], height, width, frame) + offset  # (1, 4)
            heatmap = self.processor.post_process_masks(outputs.pred_masks[cue_row][-1:], height, width)[0].clamp(min=0)
            found_box = tuple(crop_boxes[0].tolist()) if len(crop_boxes) else None
            patch_boxes, patch_scores = np.zeros((0, 4)), np.zeros((0,))
            if len(scores):  # every patch's box for the first `<loc>`
                patch_boxes = (boxes_to_original(outputs.patch_boxes[box_row][0], height, width, frame) + offset).numpy()
                patch_scores = outputs.patch_box_scores[box_row][0].float().cpu().numpy()
            results.append({"score": float(scores[0]) if len(scores) else 0.0, "box": found_box, "patch_boxes": patch_boxes,
                            "patch_scores": patch_scores, "heatmap": heatmap.cpu().numpy()})
        return results

    @torch.no_grad()
    def context_cue(self, image: Image.Image, box, target: str) -> tuple[np.ndarray | None, str]:
        """SEAL's context cue: ask where the target most likely is, locate the phrase answered; (heatmap, phrase)."""
        crop = image.crop(box)
        prompt = prompt_text(self.processor, [{"role": "user", "content": self.settings.context_template.format(target)}])
        inputs = self.processor(images=[crop], text=[prompt], return_tensors="pt")
        inputs.pop("original_sizes")
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        sequences = self.model.generate(**inputs, max_new_tokens=self.settings.context_max_new_tokens, do_sample=False)
        self.num_calls += 1
        answer = self.processor.batch_decode(sequences[:, inputs["input_ids"].shape[1]:])[0]
        for token in (self.processor.seg_token, self.processor.loc_token):  # LISA / SEAL's are not special tokens
            answer = answer.replace(token, " ")
        phrase = context_phrase(answer, target)
        if not phrase:
            return None, ""
        heatmap = self.locate(image, [box], phrase)[0]["heatmap"]
        return (normalised(heatmap) if heatmap.max() > 0 else None), phrase

    def zoom_crop(self, box, patch_box, full_size) -> tuple | None:
        """The square crop `verify_zoom` times the long side of `box` around it (never under the model's input size: a
        crop is not blown up), shifted inside the image of `full_size` (width, height); None when it would not be
        smaller than the patch (the patch already shows the box at that scale)."""
        side = math.ceil(self.settings.verify_zoom * max(box[2] - box[0], box[3] - box[1]))
        side = max(side, self.processor.image_processor.image_size)
        if side >= min(patch_box[2] - patch_box[0], patch_box[3] - patch_box[1]):
            return None
        (width, height), (center_x, center_y) = full_size, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        x0 = round(min(max(center_x - side / 2, 0), width - side))
        y0 = round(min(max(center_y - side / 2, 0), height - side))
        return (x0, y0, x0 + side, y0 + side)

    def verify(self, image: Image.Image, patch: Patch, detection: dict, query: str) -> tuple[list[dict], list[dict]]:
        """`verify_zoom`: every distinct box above `confidence_high` in the patch, looked at again in its zoom crop (one
        batched forward). Returns (the confirmed boxes, best first: the crop's box where it was looked at again, the
        patch's where the patch already shows it at that scale; every zoom check)."""
        settings = self.settings
        candidates = distinct_boxes(detection["patch_scores"], detection["patch_boxes"], settings.confidence_high,
                                    settings.boxes_nms_iou)
        crops = [self.zoom_crop(candidate["box"], patch.box, image.size) for candidate in candidates]
        confirmed = [candidate for candidate, crop in zip(candidates, crops) if crop is None]
        crops = [crop for crop in crops if crop is not None]
        checks = []
        for crop, look in zip(crops, self.locate(image, crops, query) if crops else []):
            checks.append({"crop": list(crop), "box": None if look["box"] is None else [round(v, 2) for v in look["box"]],
                           "score": round(look["score"], 4)})
            if look["score"] > settings.confidence_high and look["box"] is not None:
                confirmed.append({"box": checks[-1]["box"], "score": checks[-1]["score"]})
        return sorted(confirmed, key=lambda found: -found["score"]), checks

    def child_priority(self, child_box, path: list[Patch], parent_index: int) -> float:
        """Sum over the parent and its ancestors A of (A's heatmap mass inside the child / A's mass) / 4^level(A)."""
        priority, index = 0.0, parent_index
        while index is not None:
            ancestor = path[index]
            if ancestor.heatmap is not None and ancestor.heatmap.sum() > 0:
                ax0, ay0 = ancestor.box[0], ancestor.box[1]
                x0, y0 = max(child_box[0], ax0) - ax0, max(child_box[1], ay0) - ay0
                x1, y1 = min(child_box[2], ancestor.box[2]) - ax0, min(child_box[3], ancestor.box[3]) - ay0
                if x1 > x0 and y1 > y0:
                    inside = ancestor.heatmap[y0:y1, x0:x1].sum()
                    priority += float(inside / ancestor.heatmap.sum()) / 4 ** ancestor.level
            index = ancestor.parent
        return priority

    def run(self, image: Image.Image, target: str) -> dict:
        """`target` names the object ("red circle"); a leading article goes, as SEAL's templates say "the {}"."""
        settings = self.settings
        query = LEADING_ARTICLE.sub("", target.strip())
        started = time.perf_counter()
        width, height = image.size
        smallest = self.smallest_size(width, height)
        path: list[Patch] = []
        detections = {}  # box -> what `locate` found (children are located together, before they are visited)
        queue = []  # (-priority, order, patch): best first, ties in the order pushed
        pushed = 0
        heapq.heappush(queue, (0.0, pushed, Patch((0, 0, width, height), level=1)))
        found = None
        while queue and found is None:
            _, _, patch = heapq.heappop(queue)
            path.append(patch)
            index = len(path) - 1
            if patch.box not in detections:
                detections[patch.box] = self.locate(image, [patch.box], query)[0]
            detection = detections[patch.box]
            patch.score, patch.found_box = detection["score"], detection["box"]
            if patch.score > settings.confidence_high and settings.verify_zoom:
                patch.confirmed, patch.zoom_checks = self.verify(image, patch, detection, query)
                if patch.confirmed:
                    patch.score, patch.found_box = patch.confirmed[0]["score"], tuple(patch.confirmed[0]["box"])
                else:  # every box was a lookalike: the patch found nothing; the best look stands for the fallback
                    best_check = max(patch.zoom_checks, key=lambda check: check["score"])
                    patch.score = best_check["score"]
                    patch.found_box = None if best_check["box"] is None else tuple(best_check["box"])
            if patch.score > settings.confidence_high:
                found = patch
                break
            if min(patch.size) <= smallest:
                continue  # a leaf: detection only
            threshold = max(settings.target_cue_threshold_minimum,
                            settings.target_cue_threshold * settings.target_cue_threshold_decay ** (patch.level - 1))
            if detection["heatmap"].max() > threshold:
                patch.heatmap, patch.cue = normalised(detection["heatmap"]), "target"
            else:
                patch.heatmap, phrase = self.context_cue(image, patch.box, query)
                patch.cue = f"context: {phrase}" if phrase else "none"
            children = [Patch(box, level=patch.level + 1, parent=index) for box in split_patch(patch.box)]
            if settings.batch_children:
                new_boxes = [child.box for child in children if child.box not in detections]
                if new_boxes:
                    detections.update(zip(new_boxes, self.locate(image, new_boxes, query)))
            for child in children:
                child.priority = self.child_priority(child.box, path, index)
                pushed += 1
                heapq.heappush(queue, (-child.priority, pushed, child))
        best = found or max(path, key=lambda p: (p.score or 0.0, -path.index(p)))
        success = found is not None or (best.score or 0.0) >= settings.confidence_low
        box = None if best.found_box is None else [round(v, 2) for v in best.found_box]
        # Found on the whole image: every instance there (SEAL); else the one box.
        if found is not None and found.confirmed:
            boxes = found.confirmed if found.level == 1 else found.confirmed[:1]
        elif found is not None and found.level == 1:
            root = detections[found.box]
            boxes = distinct_boxes(root["patch_scores"], root["patch_boxes"], settings.confidence_high, settings.boxes_nms_iou)
        else:
            boxes = [{"box": box, "score": round(best.score or 0.0, 4)}] if box is not None else []
        result = {
            "target": target,
            "box": box,
            "score": round(best.score or 0.0, 4),
            "boxes": boxes,
            "success": bool(success),
            "path": [{"box": list(p.box), "level": p.level, "priority": round(p.priority, 4), "score": round(p.score or 0.0, 4),
                      "cue": p.cue, **({"zoom_checks": p.zoom_checks} if p.zoom_checks else {})} for p in path],
            "num_calls": self.num_calls,
            "num_patches_located": len(detections),
            "seconds": round(time.perf_counter() - started, 3),
            "settings": {**asdict(settings), "smallest_size": smallest},
        }
        return result


def visual_search(model, processor, image, target: str, settings: SearchSettings | None = None, **overrides) -> dict:
    """SEAL's visual search for `target` in `image` (a PIL image, array or path) with a VSM that has `<loc>` heads.

    Returns a dict: `box` ([x0, y0, x1, y1] in full-image pixels, or None), `score`, `boxes` (`[{"box", "score"}]`:
    when the whole image holds the target, every distinct box above `confidence_high`, best first; else the one
    box), `success`, `path` (every visited
    patch: its box, level, the priority that ranked it, its detection score and the cue it used), `num_calls` (model
    forwards and generations), `num_patches_located`, `seconds` and `settings` (`SearchSettings`, overridable by
    keyword, plus the `smallest_size` used)."""
    from processing_vsm import to_rgb_image

    if not isinstance(target, str) or not target.strip():
        raise ValueError("The search target is empty: name what to find, e.g. 'the red circle'.")
    settings = settings or SearchSettings()
    unknown = set(overrides) - set(asdict(settings))
    if unknown:
        raise ValueError(f"Unknown search setting(s) {sorted(unknown)}; valid: {sorted(asdict(settings))}.")
    settings = SearchSettings(**{**asdict(settings), **overrides})
    return VisualSearch(model.eval(), processor, settings).run(to_rgb_image(image), target.strip())


def draw_search(image, result: dict) -> Image.Image:
    """The visited patches (numbered, in order), the crops `verify_zoom` looked at again (white) and the final box on
    the image, as a PNG-ready RGB image."""
    from processing_vsm import to_rgb_image

    canvas = to_rgb_image(image).copy()
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(canvas.size) / 300))
    for order, step in enumerate(result["path"], start=1):
        colour = PATH_COLOURS[(step["level"] - 1) % len(PATH_COLOURS)]
        x0, y0, x1, y1 = step["box"]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=line)
        draw.text((x0 + 2 * line, y0 + 2 * line), str(order), fill=colour)
        for check in step.get("zoom_checks", []):  # `verify_zoom`'s second looks
            x0, y0, x1, y1 = check["crop"]
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=ZOOM_COLOUR, width=line)
    width = 3 * line
    for found in result.get("boxes") or ([{"box": result["box"]}] if result["box"] is not None else []):
        x0, y0, x1, y1 = found["box"]  # drawn just outside the box: a small target stays visible inside it
        draw.rectangle((x0 - width, y0 - width, x1 + width, y1 + width), outline=FOUND_COLOUR, width=width)
    return canvas


__all__ = ["SearchSettings", "visual_search", "draw_search", "split_patch", "context_phrase"]
