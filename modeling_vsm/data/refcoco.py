"""refCOCO / refCOCO+ / refCOCOg: COCO instances + referring expressions (JSON or parquet; `convert_refs_pickle`
converts refer's pickles once)."""

import json
import logging
import math
import random
from pathlib import Path

from .masks import compress_rle, polygon_problem
from .reading import SkipLog, _read_json
from .schema import SEG_ANSWER_TEMPLATES, SHORT_QUESTION_TEMPLATES, _check_answer_templates, _row, _rows_to_dataset

logger = logging.getLogger(__name__)


REFCOCO_INSTANCES_FILE = "instances.json"
REFCOCO_IMAGE_DIR = "images"
REFS_REQUIRED_KEYS = ("ref_id", "image_id", "ann_id", "split", "sentences")
REFCOCO_SPLITS = {"validation": "val", "eval": "val"}  # our split names -> refer's ("train", "val", "test", "testA", ...)
REFCOCO_NAMES = ("refcoco", "refcoco+", "refcocog")
PICKLE_TRUST_WARNING = (
    "Unpickling {path}: a pickle can run any code when loaded. Convert only a refs file you trust "
    "(downloaded from the data set's authors); VSM reads the converted JSON / parquet from now on."
)


def _decode_bytes(value):
    """Python 2 pickles read with `encoding="bytes"` hold bytes for str: decode them (UTF-8, else latin-1)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_decode_bytes(key): _decode_bytes(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode_bytes(item) for item in value]
    return value


def _sentence_texts(sentences) -> list[str]:
    """refer's `sentences` (`[{"sent": ..., "raw": ...}, ...]`) or plain strings -> the non-empty texts."""
    texts = []
    for sentence in sentences if isinstance(sentences, (list, tuple)) else []:
        if isinstance(sentence, dict):
            sentence = sentence.get("sent") or sentence.get("raw")
        if isinstance(sentence, str) and sentence.strip():
            texts.append(sentence.strip())
    return texts


def convert_refs_pickle(input_path, output_path) -> int:
    """Converts refer's `refs(unc).p` / `refs(google).p` / `refs(umd).p` (Python pickles) ONCE into the
    documented JSON (`.json`) or parquet (`.parquet`) refs layout; returns the number of refs written.

    This is the only place VSM unpickles anything, and only when a person runs it explicitly
    (`vsm convert-refs`): unpickling runs whatever code the file names, so convert only files you trust.
    Each ref keeps `ref_id`, `image_id`, `ann_id`, `split`, `category_id` and `sentences` as
    `[{"sent_id": int, "sent": str, "raw": str}, ...]`.
    """
    import pickle  # noqa: S403 - trusted-file converter, see the docstring

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"refs pickle not found: {str(input_path)!r}")
    if output_path.suffix not in (".json", ".parquet"):
        raise ValueError(f"`output_path` must end in .json or .parquet, got {str(output_path)!r}.")
    logger.warning(PICKLE_TRUST_WARNING.format(path=input_path))
    with open(input_path, "rb") as handle:
        refs = _decode_bytes(pickle.load(handle, encoding="bytes"))  # noqa: S301 - trusted by the caller
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ValueError(f"{input_path} does not hold a list of refs (dicts), got {type(refs).__name__}.")
    records = []
    for index, ref in enumerate(refs):
        missing = [key for key in REFS_REQUIRED_KEYS if key not in ref]
        if missing:
            raise ValueError(f"{input_path}: ref {index} misses keys {missing}.")
        sentences = [
            {"sent_id": int(s.get("sent_id", -1)), "sent": str(s.get("sent", "")), "raw": str(s.get("raw", s.get("sent", "")))}
            if isinstance(s, dict) else {"sent_id": -1, "sent": str(s), "raw": str(s)}
            for s in ref["sentences"]
        ]
        records.append({
            "ref_id": int(ref["ref_id"]), "image_id": int(ref["image_id"]), "ann_id": int(ref["ann_id"]),
            "split": str(ref["split"]), "category_id": int(ref.get("category_id", -1)), "sentences": sentences,
        })
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), output_path)
    else:
        output_path.write_text(json.dumps(records))
    return len(records)


def read_refs(path) -> list[dict]:
    """Reads referring expressions from JSON (a list of refs, or `{"refs": [...]}`) or parquet (one row per ref)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for broken files
            raise ValueError(f"refs file {path}: unreadable parquet ({type(error).__name__}: {error})") from None
    try:
        refs = _read_json(path)
    except ValueError as error:
        raise ValueError(f"refs file {path}: {error}") from None
    refs = refs.get("refs") if isinstance(refs, dict) else refs
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} must hold a JSON list of refs (or {{\"refs\": [...]}}).")
    return refs


def find_refcoco_files(path) -> tuple[Path, Path]:
    """`(instances.json, refs file)` for `path`: a folder holding exactly one `refs*.json` / `refs*.parquet`,
    or the refs file itself (then `instances.json` sits beside it)."""
    path = Path(path)
    if path.is_file():
        refs_path, folder = path, path.parent
    elif path.is_dir():
        folder = path
        candidates = sorted(folder.glob("refs*.json")) + sorted(folder.glob("refs*.parquet"))
        if not candidates:
            pickles = sorted(folder.glob("refs*.p"))
            if pickles:
                raise ValueError(
                    f"{folder} has only the pickle {pickles[0].name}; VSM does not unpickle data files. Convert it "
                    f"once, if you trust it: vsm convert-refs --input '{pickles[0]}' --output '{folder / 'refs.json'}'"
                )
            raise FileNotFoundError(f"No refs*.json or refs*.parquet in {str(folder)!r}.")
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            raise ValueError(f"{folder} has several refs files ({names}): name one, e.g. refcoco:{candidates[0]}")
        refs_path = candidates[0]
    else:
        raise FileNotFoundError(f"refCOCO folder or refs file not found: {str(path)!r}")
    instances_path = folder / REFCOCO_INSTANCES_FILE
    if not instances_path.is_file():
        raise FileNotFoundError(f"No {REFCOCO_INSTANCES_FILE} beside the refs file in {str(folder)!r}.")
    return instances_path, refs_path


def _coco_index(instances_path: Path):
    """`(images by id, annotations by id)` from a COCO instances JSON."""
    try:
        instances = _read_json(instances_path)
    except ValueError as error:
        raise ValueError(f"{instances_path}: {error}") from None
    if not isinstance(instances, dict) or not all(isinstance(instances.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{instances_path} must be a COCO instances JSON with `images` and `annotations` lists.")
    images = {item["id"]: item for item in instances["images"] if isinstance(item, dict) and "id" in item}
    annotations = {item["id"]: item for item in instances["annotations"] if isinstance(item, dict) and "id" in item}
    return images, annotations


def _coco_target(segmentation, height: int, width: int):
    """COCO `segmentation` -> `(polygons, rles, dropped polygon problems)`; raises ValueError when nothing usable."""
    if isinstance(segmentation, dict):
        return [], [compress_rle(segmentation, height, width)], []
    if not isinstance(segmentation, list):
        raise ValueError("no `segmentation` polygons or RLE")
    polygons, problems = [], []
    for k, polygon in enumerate(segmentation):
        problem = polygon_problem(polygon, height, width)
        if problem:
            problems.append(f"polygon {k}: {problem}")
        else:
            polygons.append([float(v) for v in polygon])
    if not polygons:
        raise ValueError(f"no usable polygon ({'; '.join(problems) or 'none given'})")
    return polygons, [], problems


def _refcoco_rows(instances_path, refs_path, image_dir, split, answer_templates, seed, name):
    images, annotations = _coco_index(instances_path)
    refs = read_refs(refs_path)
    wanted = REFCOCO_SPLITS.get(split, split)
    available = sorted({str(ref.get("split")) for ref in refs if isinstance(ref, dict)})
    if wanted not in available:
        raise ValueError(f"No refs of split {wanted!r} in {refs_path}: it has {available}.")
    skips, num_rows, seen, image_found = SkipLog(f"{name} ref"), 0, 0, {}
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or ref.get("split") != wanted:
            continue
        seen += 1
        where = f"{refs_path.name} ref {ref.get('ref_id', f'#{index}')}"
        try:
            missing = [key for key in REFS_REQUIRED_KEYS if key not in ref]
            if missing:
                raise ValueError(f"missing keys {missing}")
            sentences = _sentence_texts(ref["sentences"])
            if not sentences:
                raise ValueError("no sentence")
            annotation, image = annotations.get(ref["ann_id"]), images.get(ref["image_id"])
            if annotation is None or image is None:
                raise ValueError(f"annotation {ref['ann_id']} or image {ref['image_id']} is not in {instances_path}")
            if not all(isinstance(image.get(key), int) and image[key] > 0 for key in ("height", "width")):
                raise ValueError(f"image {ref['image_id']} has no positive `height` / `width` in {instances_path}")
            image_path = Path(image_dir) / str(image.get("file_name", ""))
            if image_path not in image_found:
                image_found[image_path] = image_path.is_file()
            if not image_found[image_path]:
                raise ValueError(f"missing image {image_path}")
            polygons, rles, problems = _coco_target(annotation.get("segmentation"), image["height"], image["width"])
        except ValueError as error:
            skips.skip(where, str(error))
            continue
        for problem in problems:
            skips.skip(f"{instances_path.name} annotation {ref['ann_id']}", f"dropped {problem}", counted=False)
        for k, sentence in enumerate(sentences):
            rng = random.Random(f"vsm-{name}/{seed}/{ref['ref_id']}/{k}")
            num_rows += 1
            yield _row(
                {"path": str(image_path), "bytes": None},  # decoded lazily, when a row is read
                rng.choice(SHORT_QUESTION_TEMPLATES).format(query=sentence),
                rng.choice(answer_templates),
                masks=[polygons],
                mask_rles=[rles],
                query_type=name,
                chance_iou=math.nan,
                source=name,
                sample_id=f"{name}-{ref['ref_id']}-{k}",
            )
    skips.report(refs_path, seen)
    skips.fail_if_empty(num_rows, refs_path, seen)


def load_refcoco(
    path,
    split: str = "train",
    image_dir=None,
    answer_templates=SEG_ANSWER_TEMPLATES,
    seed: int = 0,
    name: str | None = None,
    streaming: bool = False,
):
    """Reads refCOCO / refCOCO+ / refCOCOg: COCO instances JSON + referring expressions (JSON or parquet).

    One sample per sentence of every ref of `split`: LISA's short question templates around the sentence,
    an answer with one `<SEG>` (both drawn by seed), the referred annotation's polygons (`masks`) or RLE
    (`mask_rles`) as the mask. Images are read lazily from `image_dir / file_name`.

    Args:
        path: a folder with `instances.json` and one `refs*.json` / `refs*.parquet`, or that refs file.
            Each ref: `ref_id`, `image_id`, `ann_id`, `split`, `sentences` (`[{"sent": ...}, ...]` or
            strings). refer's `refs(unc).p` pickles are converted once with `convert_refs_pickle`.
        split (`str`): refer's split names (`train`, `val`, `test`, `testA`, `testB`); `validation` -> `val`.
        image_dir: the COCO images folder (default `<folder>/images`).
        name (`str`): `source` and `query_type` of the rows; defaults to the folder name when it is one of
            refcoco / refcoco+ / refcocog, else "refcoco".

    A ref with a missing image, annotation or key, no sentence, or no usable polygon (< 3 points, NaN, entirely
    outside the image) is skipped with a counted warning naming the file; a bad polygon beside good ones is dropped.
    """
    instances_path, refs_path = find_refcoco_files(path)
    folder = instances_path.parent
    image_dir = Path(image_dir) if image_dir is not None else folder / REFCOCO_IMAGE_DIR
    if not image_dir.is_dir():
        raise FileNotFoundError(f"refCOCO image folder not found: {str(image_dir)!r}")
    if name is None:
        name = folder.name.lower() if folder.name.lower() in REFCOCO_NAMES else REFCOCO_NAMES[0]
    return _rows_to_dataset(
        _refcoco_rows, streaming, instances_path=instances_path, refs_path=refs_path, image_dir=image_dir,
        split=split, answer_templates=_check_answer_templates(answer_templates), seed=seed, name=name,
    )
