"""The common sample schema (`FEATURES`, described in `modeling_vsm.data`), its tokens and LISA's templates, and
building datasets of schema rows (in memory or streamed)."""

import math

import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features, Image, IterableDataset, List, Value
from datasets.table import InMemoryTable


SEG_TOKEN = "<SEG>"
LOC_TOKEN = "<loc>"
TARGET_LABEL = 1
IGNORE_LABEL = 255  # LISA: pixels excluded from loss and metrics
# The box of a `<loc>` whose referent is NOT in the image (a "not here" answer): no box loss, every patch's score is
# pushed down. A box of NaNs, since the schema holds exactly four numbers per `<loc>`.
ABSENT_BOX = (math.nan,) * 4

FEATURES = Features(
    {
        "image": Image(),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "masks": List(List(List(Value("float64")))),  # (num_seg, num_polygons, 2 * num_points)
        "ignore": List(List(List(Value("float64")))),  # (num_seg, num_polygons, 2 * num_points)
        "mask_rles": List(List({"size": List(Value("int64"), length=2), "counts": Value("string")})),  # (num_seg, num_rles)
        "boxes": List(List(Value("float64"), length=4)),  # (num_loc, 4) xyxy pixels; ABSENT_BOX: not in the image
        "is_sentence": Value("bool"),
        "query_type": Value("string"),
        "chance_iou": Value("float64"),
        "source": Value("string"),
        "id": Value("string"),
    }
)
SEGMENTATION_QUERY_TYPES = ("colour", "kind", "position", "size", "sentence")
QUERY_TYPES = SEGMENTATION_QUERY_TYPES + ("loc", "vqa", "reasonseg", "search")

# LISA's templates (utils/utils.py) with `[SEG]` -> `<SEG>` and without the leading "<image>\n".
SHORT_QUESTION_TEMPLATES = (
    "Can you segment {query} in this image?",
    "Please segment {query} in this image.",
    "What is {query} in this image? Please respond with segmentation mask.",
    "What is {query} in this image? Please output segmentation mask.",
)
LONG_QUESTION_TEMPLATES = (
    "{query} Please respond with segmentation mask.",
    "{query} Please output segmentation mask.",
)
SEG_ANSWER_TEMPLATES = (
    "It is <SEG>.",
    "Sure, <SEG>.",
    "Sure, it is <SEG>.",
    "Sure, the segmentation result is <SEG>.",
    "<SEG>.",
)
# The wrapping LISA's ReasonSeg dataset uses for evaluation-style prompts.
REASONSEG_SHORT_TEMPLATE = SHORT_QUESTION_TEMPLATES[3]
REASONSEG_LONG_TEMPLATE = LONG_QUESTION_TEMPLATES[1]


def _row(
    image,
    instruction,
    answer,
    *,
    query_type,
    chance_iou,
    source,
    sample_id,
    masks=(),
    ignore=None,
    mask_rles=None,
    boxes=(),
    is_sentence=False,
    messages=None,
):
    """One schema row; `ignore` and `mask_rles` default to none per mask; `messages` (multi-turn) replaces
    `instruction` and `answer`."""
    if messages is None:
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
    return {
        "image": image,
        "messages": messages,
        "masks": [list(mask) for mask in masks],
        "ignore": [[] for _ in masks] if ignore is None else [list(region) for region in ignore],
        "mask_rles": [[] for _ in masks] if mask_rles is None else [list(rles) for rles in mask_rles],
        "boxes": [list(box) for box in boxes],
        "is_sentence": is_sentence,
        "query_type": query_type,
        "chance_iou": chance_iou,
        "source": source,
        "id": sample_id,
    }


def _dataset_from_rows(rows) -> Dataset:
    """An in-memory `Dataset` of schema rows. The rows are already in Arrow's storage form (images as
    `{"bytes", "path"}` dicts), so pyarrow builds the table directly: about 2x faster than `from_dict`."""
    columns = {name: [] for name in FEATURES}
    for row in rows:
        for name in FEATURES:
            columns[name].append(row[name])
    table = pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=FEATURES))


def _stream_rows(make_rows, **kwargs):
    yield from make_rows(**kwargs)


def _rows_to_dataset(make_rows, streaming: bool, **kwargs):
    """`Dataset` of the rows `make_rows(**kwargs)` yields or, with `streaming=True`, an `IterableDataset` that
    reads them lazily (then bad items are reported, and an empty result raises, when iteration reaches them)."""
    if streaming:
        return IterableDataset.from_generator(
            _stream_rows, features=FEATURES, gen_kwargs={"make_rows": make_rows, **kwargs}
        )
    return _dataset_from_rows(make_rows(**kwargs))


def _check_answer_templates(answer_templates) -> tuple:
    answer_templates = tuple(answer_templates)
    if not answer_templates or any(not isinstance(t, str) or t.count(SEG_TOKEN) != 1 for t in answer_templates):
        raise ValueError(
            f"`answer_templates` must be non-empty strings with exactly one {SEG_TOKEN}, got {answer_templates}."
        )
    return answer_templates
