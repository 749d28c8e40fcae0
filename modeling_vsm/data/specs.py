"""Data specs (`synthetic`, `reasonseg:PATH`, `refcoco:PATH[@IMAGE_DIR]`, `llava:PATH[@IMAGE_DIR]`, mixtures
`a+b` with optional weights): `load_data_spec` and its helpers (`split_data_spec`, `parse_data_weights`,
`with_images`)."""

import math
import re
from pathlib import Path

from datasets import Image, IterableDataset, concatenate_datasets, interleave_datasets

from .llava import load_llava
from .reasonseg import REASONSEG_EXPLANATORY_DIR, load_reasonseg
from .refcoco import load_refcoco
from .schema import FEATURES
from .synthetic import REFERENCE_IMAGE_SIZE, SPLIT_ALIASES, load_synthetic


def _head(dataset, num_samples: int | None):
    if num_samples is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.take(num_samples)
    return dataset.select(range(min(num_samples, len(dataset))))


def _split_names(split: str) -> tuple:
    """`split` and its aliases: "validation" -> ("validation", "val", "eval")."""
    canonical = SPLIT_ALIASES.get(split, split)
    names = (split, canonical, *(alias for alias, name in SPLIT_ALIASES.items() if name == canonical))
    return tuple(dict.fromkeys(names))


def _split_folder(folder: Path, split: str) -> Path:
    """`folder/<split>` (or an alias: validation <-> val / eval) when it exists, else `folder`."""
    return next((folder / name for name in _split_names(split) if (folder / name).is_dir()), folder)


def _path_and_images(prefix: str, argument: str) -> tuple[str, str | None]:
    """Splits `PATH@IMAGE_DIR` (the image folder is optional)."""
    if not argument:
        raise ValueError(f"The `{prefix}` data spec needs a path: '{prefix}:PATH' or '{prefix}:PATH@IMAGE_DIR'.")
    path, at, image_dir = argument.rpartition("@")
    return (path, image_dir or None) if at else (argument, None)


def _load_synthetic_spec(argument, split, seed, num_samples, image_size, streaming):
    if argument:
        raise ValueError(f"The `synthetic` data spec takes no argument, got 'synthetic:{argument}'.")
    return load_synthetic(split, num_samples=num_samples, seed=seed, image_size=image_size, streaming=streaming)


def _load_reasonseg_spec(argument, split, seed, num_samples, image_size, streaming):
    if not argument:
        raise ValueError("The `reasonseg` data spec needs a folder: 'reasonseg:PATH'.")
    root = Path(argument)
    candidates = [root / REASONSEG_EXPLANATORY_DIR / f"{name}.json" for name in _split_names(split)]
    dataset = load_reasonseg(
        _split_folder(root, split), seed=seed, streaming=streaming,
        explanations=next((candidate for candidate in candidates if candidate.is_file()), None),
    )
    return _head(dataset, num_samples)


def _load_refcoco_spec(argument, split, seed, num_samples, image_size, streaming):
    path, image_dir = _path_and_images("refcoco", argument)
    return _head(load_refcoco(path, split=split, image_dir=image_dir, seed=seed, streaming=streaming), num_samples)


def _load_llava_spec(argument, split, seed, num_samples, image_size, streaming):
    path, image_dir = _path_and_images("llava", argument)
    path = Path(path)
    if path.is_dir():  # a folder of <split>.json / <split>.jsonl files
        names = [f"{name}{ext}" for name in _split_names(split) for ext in (".json", ".jsonl")]
        found = next((path / name for name in names if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"No {' or '.join(names)} in the LLaVA folder {str(path)!r}.")
        path = found
    return _head(load_llava(path, image_dir=image_dir, streaming=streaming), num_samples)


# prefix -> loader(argument, split, seed, num_samples, image_size, streaming) -> a Dataset or an IterableDataset.
DATA_SPEC_LOADERS = {
    "synthetic": _load_synthetic_spec,
    "reasonseg": _load_reasonseg_spec,
    "refcoco": _load_refcoco_spec,
    "llava": _load_llava_spec,
}
DATA_SPEC_SEPARATOR = "+"
DEFAULT_STOPPING_STRATEGY = "all_exhausted"  # weighted mixtures: an epoch ends once every part was seen


def split_data_spec(spec: str) -> list[str]:
    """`"a:X+b:Y"` -> `["a:X", "b:Y"]`: splits at a `+` followed by a known prefix, so paths such as
    `refcoco:data/refcoco+` keep their `+`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"`spec` must be a non-empty string such as 'synthetic', got {spec!r}.")
    prefixes = "|".join(re.escape(prefix) for prefix in DATA_SPEC_LOADERS)
    separator = rf"{re.escape(DATA_SPEC_SEPARATOR)}(?=\s*(?:{prefixes})(?::|{re.escape(DATA_SPEC_SEPARATOR)}|\s*$))"
    return [part.strip() for part in re.split(separator, spec.strip())]


def parse_data_weights(text) -> list[float]:
    """`"9,3,1"` (or a list of numbers) -> `[9.0, 3.0, 1.0]`; each weight finite and > 0."""
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ValueError(f"Data weights must be numbers such as '9,3,1', got {text!r}.") from None
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"Data weights must be finite and > 0 (drop a part instead of weighting it 0), got {text!r}.")
    return weights


def _rowwise(transform):
    """A per-row `transform(row) -> row` as a `Dataset.set_transform` batch function."""

    def apply(batch: dict) -> dict:
        size = len(next(iter(batch.values())))
        rows = [transform({name: values[i] for name, values in batch.items()}) for i in range(size)]
        return {name: [row[name] for row in rows] for name in rows[0]} if rows else batch

    return apply


def with_images(dataset):
    """The rows that have an image (drops text-only rows such as LLaVA's), without decoding any image."""
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda row: row["image"] is not None)
    if dataset.data.column("image").null_count == 0:  # the whole table, before any `select`: nothing to drop
        return dataset
    image_feature = dataset.features["image"]
    undecoded = dataset.cast_column("image", Image(decode=False))
    return undecoded.filter(lambda image: image is not None, input_columns="image").cast_column("image", image_feature)


def load_data_spec(
    spec: str,
    split: str = "train",
    seed: int = 0,
    num_samples: int | None = None,
    image_size: int = REFERENCE_IMAGE_SIZE,
    weights=None,
    streaming: bool = False,
    transform=None,
    stopping_strategy: str = DEFAULT_STOPPING_STRATEGY,
):
    """Loads a data spec into the common schema.

    Specs (README "Data"): `synthetic`; `reasonseg:PATH` (uses `PATH/<split>` when it exists, and
    `PATH/explanatory/<split>.json` as explanations when present); `refcoco:PATH[@IMAGE_DIR]`;
    `llava:PATH[@IMAGE_DIR]` (a JSON / JSONL file, or a folder of `<split>.json`); and mixtures
    `spec1+spec2+...`.

    Args:
        num_samples (`int`, *optional*): keep the first `num_samples` rows of each part.
        weights (*optional*): sampling weights of the parts (`[9, 3, 1]` or `"9,3,1"`): the parts are
            interleaved with these probabilities, seeded by `seed`, oversampling the smaller parts until
            every part was seen (`stopping_strategy`). Without weights the parts are concatenated.
        streaming (`bool`): return an `IterableDataset` that reads files lazily (for data sets larger
            than memory); the collator takes its rows the same way.
        transform (*optional*): `row -> row`, applied on the fly when a row is read (images are already
            decoded lazily from their paths), e.g. to re-draw answers or resize images.

    Returns:
        a `datasets.Dataset` (or `IterableDataset` with `streaming=True`) with the features `FEATURES`.
    """
    parts = []
    for part in split_data_spec(spec):
        prefix, _, argument = part.partition(":")
        if prefix not in DATA_SPEC_LOADERS:
            raise ValueError(f"Unknown data spec {part!r} in {spec!r}: known prefixes are {sorted(DATA_SPEC_LOADERS)}.")
        dataset = DATA_SPEC_LOADERS[prefix](argument, split, seed, num_samples, image_size, streaming)
        parts.append(dataset if dataset.features == FEATURES else dataset.cast(FEATURES))
    if weights is not None:
        weights = parse_data_weights(weights)
        if len(weights) != len(parts):
            raise ValueError(f"Got {len(weights)} data weights for {len(parts)} data specs in {spec!r}.")
    if len(parts) == 1:
        dataset = parts[0]
    elif weights is None:
        dataset = concatenate_datasets(parts)
    else:
        probabilities = [weight / sum(weights) for weight in weights]
        dataset = interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping_strategy)
    if transform is not None:
        dataset = dataset.map(transform) if isinstance(dataset, IterableDataset) else dataset.with_transform(_rowwise(transform))
    return dataset
