"""VSM data: the common sample schema, built-in synthetic shapes data, ReasonSeg I/O, data specs.

Every loader returns a `datasets.Dataset` with exactly the columns of `FEATURES`:

- `image`: the image (`datasets.Image`, a PIL image when read).
- `messages`: `[{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]`.
  The instruction never holds `<image>`; the collator attaches the image to the first user turn.
- `masks`: one entry per `<SEG>` in the answer(s), in order; each entry a list of polygons, each a
  flat `[x0, y0, x1, y1, ...]` in original image pixels (x right, y down). All polygons of one
  entry together form one mask.
- `ignore`: parallel to `masks`: per `<SEG>`, the ignore-region polygons (LISA's label 255).
- `mask_rles`: parallel to `masks`: per `<SEG>`, COCO RLEs `{"size": [h, w], "counts": str}`
  (compressed counts, the image's size) that belong to the same mask as its polygons (COCO crowd
  annotations); usually empty.
- `boxes`: one `[x0, y0, x1, y1]` (pixels) per `<loc>` in the answer; `ABSENT_BOX` (four NaNs) when the referent is
  not in the image (a "not here" answer, as the search rows of the synthetic train split have).
- `is_sentence`, `query_type`, `chance_iou`, `source`, `id`: see `FEATURES`.

The synthetic data (coloured circles, squares and triangles on a plain background, queried by
colour, kind, position, size or a full sentence) is the project's default data: a referent is always
unique under its query, and `chance_iou` records what picking a random object would score, so
per-query-type gIoU can be read against chance.

References:
- LISA (Lai et al. 2023, github.com/dvlab-research/LISA): the question / answer templates
  (`utils/utils.py`) and the ReasonSeg JSON layout and its reading (`utils/data_processing.py`:
  labels containing "ignore" -> 255, label "flag" dropped). Deviation: in `rasterize_mask` ignore
  polygons always win over target polygons (LISA paints polygons largest first, so the smaller wins).
- SEAL / V* (Wu & Xie 2023): `<loc>` box answers.

The package, one module per concern (`from modeling_vsm.data import ...` reaches every public name, as before):

- `schema`: `FEATURES`, `SEG_TOKEN` / `LOC_TOKEN`, LISA's question and answer templates, rows -> datasets.
- `shapes`: the colours, kinds and polygons of the synthetic shapes.
- `highres`: large canvases with one small target, the search's patches, and the search rows of the train split.
- `synthetic`: the synthetic scenes, queries and splits (`load_synthetic`, `iter_synthetic_samples`).
- `masks`: `rasterize_mask`, `sample_mask`, COCO RLE encoding / decoding (pycocotools), `polygon_problem`.
- `reading`: JSON reading and the counter of skipped items (`SkipLog`, `collect_skipped`).
- `reasonseg`, `refcoco`, `llava`: the real-data loaders (`load_reasonseg`, `export_reasonseg`, `load_refcoco`,
  `convert_refs_pickle`, `load_llava`).
- `specs`: data specs and weighted mixtures (`load_data_spec`, `parse_data_weights`, `with_images`).
"""

from .schema import (  # noqa: F401
    ABSENT_BOX, FEATURES, IGNORE_LABEL, LOC_TOKEN, LONG_QUESTION_TEMPLATES, QUERY_TYPES, REASONSEG_LONG_TEMPLATE,
    REASONSEG_SHORT_TEMPLATE, SEGMENTATION_QUERY_TYPES, SEG_ANSWER_TEMPLATES, SEG_TOKEN, SHORT_QUESTION_TEMPLATES,
    TARGET_LABEL,
)
from .synthetic import (  # noqa: F401
    BACKGROUND_COLOURS, BACKGROUND_JITTER, BORDER_MARGIN, CIRCLE_VERTICES, COLOURS, COLOUR_ANSWER, COLOUR_PHRASES,
    COLOUR_QUESTION, CONFUSABLE_KINDS, COUNT_ANSWER, COUNT_QUESTIONS, DEFAULT_SPLIT_SIZES, DEFAULT_TASK_MIX, KINDS,
    KIND_ANSWER, KIND_PHRASES, KIND_QUESTION, LOC_ANSWER_TEMPLATES, LOC_BY_ATTRIBUTE_PROBABILITY,
    LOC_QUESTION_TEMPLATES, MAX_OBJECTS, MAX_OBJECT_SIZE, MAX_PLACEMENT_TRIES, MAX_ROTATION_DEGREES,
    MAX_SCENE_TRIES, MIN_IMAGE_SIZE, MIN_OBJECTS, MIN_OBJECT_SIZE, NUMBER_WORDS, OBJECT_GAP, POLYGON_DECIMALS,
    POSITION_MARGIN, POSITION_PHRASES, REFERENCE_IMAGE_SIZE, SENTENCE_DESCRIPTIONS, SENTENCE_TEMPLATES, SHAPE_REACH,
    SIZE_PHRASES, SIZE_RATIO_MARGIN, SPLIT_ALIASES, SPLIT_HARD_KIND_SHARE, SPLIT_INDEX, SPLIT_TASK_MIX, SceneObject,
    TRAIN_HARD_KIND_SHARE, TRAIN_TASK_MIX, _shape_polygon, generate_scene, iter_synthetic_samples, load_synthetic,
    make_synthetic_dataset, polygon_area, render_scene, synthetic_text_corpus,
)
from .highres import (  # noqa: F401
    SEARCH_LOCATE_TEMPLATE, HighresScene, generate_highres_scene, leaf_side, search_patches, search_row, split_patch,
)
from .masks import (  # noqa: F401
    compress_rle, polygon_problem, rasterize_mask, rle_decode, rle_encode, sample_mask,
)
from .reading import (  # noqa: F401
    MAX_LOGGED_SKIPS, SkipLog, collect_skipped,
)
from .reasonseg import (  # noqa: F401
    EXPLANATORY_QUESTIONS, EXPORT_JPEG_QUALITY, IMAGE_EXTENSIONS, REASONSEG_EXPLANATORY_DIR,
    REASONSEG_REQUIRED_KEYS, export_reasonseg, load_reasonseg, read_explanations,
)
from .refcoco import (  # noqa: F401
    PICKLE_TRUST_WARNING, REFCOCO_IMAGE_DIR, REFCOCO_INSTANCES_FILE, REFCOCO_NAMES, REFCOCO_SPLITS,
    REFS_REQUIRED_KEYS, convert_refs_pickle, find_refcoco_files, load_refcoco, read_refs,
)
from .llava import (  # noqa: F401
    LLAVA_IMAGE_PLACEHOLDER, LLAVA_ROLES, load_llava,
)
from .specs import (  # noqa: F401
    DATA_SPEC_LOADERS, DATA_SPEC_SEPARATOR, DEFAULT_STOPPING_STRATEGY, load_data_spec, parse_data_weights,
    split_data_spec, with_images,
)
