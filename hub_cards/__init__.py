"""Model cards (README.md) for saved VSM folders, rendered from the config, the training run and `vsm eval`.

One renderer serves every writer: `vsm train` (the README next to the checkpoint), `save_pretrained` of a model
trained with `VSMTrainer` (which attaches the card with `attach_model_card`), and `vsm push` (which re-renders
the card of a saved folder with the repo id, `render_folder_card`). The metadata block is built with
`huggingface_hub.ModelCardData`, so `model-index` is what the Hub parses (`ModelCard(...).data.eval_results`).
"""

import json
import re
from functools import partial
from pathlib import Path
from string import Template

TEMPLATE_PATH = Path(__file__).with_name("model_card.md")
TAGS = ("vsm", "reasoning-segmentation", "referring-segmentation", "visual-search", "custom_code")
LICENSE = "apache-2.0"
PIPELINE_TAG = "image-segmentation"
TASK_NAME = "Reasoning segmentation"
# metrics.json key -> (model-index metric type, display name); the fractions a `vsm eval` summary reports.
CARD_METRICS = {
    "giou": ("giou", "gIoU"),
    "ciou": ("ciou", "cIoU"),
    "seg_emission_rate": ("seg_emission_rate", "SEG-token emission rate"),
    "box_accuracy": ("box_accuracy", "box accuracy (IoU >= 0.5)"),
    "box_miou": ("box_miou", "box mean IoU"),
}
DENSE_FEATURE_TEXT = {
    "shared": "the VLM's own vision-tower patches: one image-encoder pass for text and masks",
    "lm": "the LM's hidden states at the image positions, instruction first: one encoder pass, instruction-aware. "
          "They read only the first question, so ask one segmentation or box question per conversation",
    "detector": "an OWL-ViT image encoder, as SEAL's VSM",
    "sam": "a SAM ViT image encoder, as LISA",
}
DATASET_NAMES = {"synthetic": "VSM synthetic shapes", "reasonseg": "ReasonSeg", "refcoco": "RefCOCO", "llava": "LLaVA"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, not a local path
# The usage snippet's user turn: VSM's own templates read the instruction before the image; the LLaVA-v1 templates of
# converted LISA / SEAL checkpoints put the image first, as they were trained.
EXAMPLE_CONTENT = {
    "text_first": '[{"type": "text", "text": "Please segment the red shape."}, {"type": "image"}]',
    "image_first": '[{"type": "image"}, {"type": "text", "text": "\\nWhat can hold water? Please output segmentation mask."}]',
}
TRAINING_FILE = "train_metrics.json"  # written by `vsm train`
METRICS_FILE = "metrics.json"  # written by `vsm train` and `vsm eval`


def _shape(config) -> str:
    """A one-line size summary of a sub-config (hidden size, layers, image size / patch when it has them)."""
    fields = [f"`{config.model_type}`"]
    if getattr(config, "hidden_size", None):
        fields.append(f"hidden {config.hidden_size}")
    if getattr(config, "num_hidden_layers", None):
        fields.append(f"{config.num_hidden_layers} layers")
    if getattr(config, "image_size", None):
        fields.append(f"{config.image_size} px / patch {config.patch_size}")
    return ", ".join(fields)


def describe_parts(config, base_models: dict | None = None) -> list[tuple[str, str, str]]:
    """(part, base model, shape) rows: vision tower, LM, SAM mask decoder, OWL-ViT, for the model card."""
    base_models = base_models or {}
    sam, detector = config.sam_config, config.detector_config
    decoder = sam.mask_decoder_config
    sam_shape = f"`sam` mask decoder, width {decoder.hidden_size}, {decoder.num_hidden_layers} layers"
    if config.dense_feature_source == "sam":
        sam_shape += f"; image encoder {_shape(sam.vision_config)}"
    detector_shape = f"`owlvit` box / class heads, query width {detector.text_config.hidden_size}"
    if config.dense_feature_source == "detector":
        detector_shape += f"; image encoder {_shape(detector.vision_config)}"
    parts = [
        ("vision tower", base_models.get("vlm") or "-", _shape(config.vision_config)),
        ("language model", base_models.get("vlm") or "-",
         f"{_shape(config.text_config)}, vocabulary {config.text_config.vocab_size}"),
        ("SAM prompt encoder + mask decoder", base_models.get("sam") or "-", sam_shape),
    ]
    if getattr(config, "loc_token_index", None) is not None:  # a model without box heads (LISA) has no such row
        parts.append(("OWL-ViT heads (`<loc>`)", base_models.get("detector") or "-", detector_shape))
    return parts


def dataset_of(spec: str | None) -> tuple[str, str]:
    """(model-index dataset type, display name) of a data spec such as `reasonseg:/data/ReasonSeg`."""
    if not spec:
        return "unknown", "unknown"
    prefixes = [part.strip().partition(":")[0] for part in spec.split("+")]
    return "+".join(prefixes), " + ".join(DATASET_NAMES.get(prefix, prefix) for prefix in prefixes)


def eval_results(metrics: dict | None, data: str | None = None) -> list:
    """`huggingface_hub.EvalResult`s of a `vsm eval` summary (its `data` / `split`, or `data`)."""
    from huggingface_hub import EvalResult

    if not metrics:
        return []
    dataset_type, dataset_name = dataset_of(metrics.get("data") or data)
    results = []
    for key, (metric_type, metric_name) in CARD_METRICS.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and value == value:  # skips None and NaN
            results.append(EvalResult(
                task_type=PIPELINE_TAG, task_name=TASK_NAME, dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_split=metrics.get("split", "validation"), metric_type=metric_type,
                metric_value=round(float(value), 4), metric_name=metric_name,
            ))
    return results


def card_metadata(title: str, training: dict | None, metrics: dict | None, base_models: dict | None,
                  license: str = LICENSE) -> str:
    """The YAML front matter: library, pipeline, license, tags, base models (Hub ids only), `model-index`."""
    from huggingface_hub import ModelCardData

    hub_bases = sorted({m for m in (base_models or {}).values() if isinstance(m, str) and HUB_ID.match(m)})
    data = (training or {}).get("data")
    results = eval_results(metrics, data)
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TAG, license=license, tags=list(TAGS),
        base_model=hub_bases or None, model_name=title if results else None, eval_results=results or None,
    )
    return card_data.to_yaml()


def _training_text(training: dict | None) -> str:
    if not training:
        return "Not recorded."
    return "\n".join(f"- {key}: `{value}`" for key, value in training.items() if value is not None)


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _evaluation_text(metrics: dict | None) -> str:
    if not metrics:
        return "Not evaluated yet: `vsm eval --model DIR --data SPEC --output DIR/metrics.json`."
    dataset_type, dataset_name = dataset_of(metrics.get("data"))
    lines = [f"On {dataset_name} ({metrics.get('split', 'validation')} split, {metrics.get('num_samples')} "
             "segmentation queries):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(metrics[key])} |" for key, (_, name) in CARD_METRICS.items() if key in metrics]
    for key, label in (("chance_iou", "chance gIoU (a random object of the scene)"),
                       ("swap_iou", "swap test IoU (1.0 = instruction ignored)")):
        if metrics.get(key) is not None:
            lines.append(f"| {label} | {_fmt(metrics[key])} |")
    groups = {**(metrics.get("per_type") or {}),
              **{f"all {name}s": part for name, part in (metrics.get("by_is_sentence") or {}).items()}}
    if groups:
        lines += ["", "| queries | gIoU | cIoU | chance | n |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(part['giou'])} | {_fmt(part['ciou'])} | {_fmt(part.get('chance_iou'))} | "
                  f"{part['num_samples']} |" for name, part in groups.items()]
    return "\n".join(lines)


def render_model_card(model, repo: str, training: dict | None = None, metrics: dict | None = None,
                      base_models: dict | None = None, num_parameters: int | None = None, license: str | None = None) -> str:
    """The README.md of a VSM.

    Args:
        model: a `VSMForCausalLM` (or its `VSMConfig`, then pass `num_parameters`).
        repo: the Hub repo id or local folder the usage snippet loads from.
        training: the training run (`data`, `steps`, `trainable` ("full", "lora", ...), ...), shown as a list.
        metrics: a `vsm eval` summary (`metrics.json`): a table, and `model-index` metadata.
        base_models: `{"vlm", "sam", "detector"}` -> the checkpoints the parts came from; defaults to
            `config.base_models`, which `vsm build` records in config.json.
        license: the card's license; default: the source's for a converted checkpoint (`config.converted_from`,
            written by `vsm convert` and kept through fine-tuning), else apache-2.0.
    """
    config = getattr(model, "config", model)
    base_models = base_models if base_models is not None else getattr(config, "base_models", None)
    converted_from = getattr(config, "converted_from", None) or {}
    if converted_from:  # where the weights came from, before what trained them since
        training = {f"converted from ({converted_from.get('source', '?')})": converted_from.get("checkpoint"),
                    "source license": converted_from.get("license"),
                    "vision tower": converted_from.get("vision_tower"), **(training or {})}
    license = license or converted_from.get("license") or LICENSE
    if num_parameters is None and hasattr(model, "parameters"):
        num_parameters = sum(p.numel() for p in model.parameters())
    title = Path(str(repo).rstrip("/")).name or "vsm"
    parts = describe_parts(config, base_models)
    return Template(TEMPLATE_PATH.read_text()).substitute(
        metadata=card_metadata(title, training, metrics, base_models, license).strip(),
        title=title,
        repo=repo,
        parts="\n".join(f"| {part} | {base} | {shape} |" for part, base, shape in parts),
        dense_feature_source=config.dense_feature_source,
        dense_feature_text=DENSE_FEATURE_TEXT.get(config.dense_feature_source, ""),
        parameters=f"{num_parameters / 1e6:.2f}M" if num_parameters else "unknown",
        training=_training_text(training),
        example_content=EXAMPLE_CONTENT["image_first" if converted_from else "text_first"],
        evaluation=_evaluation_text(metrics),
    )


def _write_card(model, repo=None, training=None, metrics=None, base_models=None, save_directory=None) -> str:
    return render_model_card(model, repo or Path(save_directory).name, training, metrics, base_models)


def attach_model_card(model, repo: str | None = None, training: dict | None = None, metrics: dict | None = None,
                      base_models: dict | None = None) -> None:
    """Makes `model.save_pretrained(dir)` write `dir/README.md` (this renderer; repo defaults to the folder name).
    A peft-wrapped model gets the card on its base VSM, which `merge_and_unload` returns."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.model_card = partial(_write_card, repo=repo, training=training, metrics=metrics, base_models=base_models)


def training_from_trainer(trainer) -> dict:
    """The training run of a `transformers.Trainer` for the card: data sources, steps, batch, learning rate, LoRA."""
    args, model = trainer.args, trainer.model
    data = trainer.train_dataset
    has_sources = hasattr(data, "unique") and "source" in (getattr(data, "column_names", None) or [])
    sources = sorted(data.unique("source")) if has_sources else None  # map-style datasets only
    return {
        "data": "+".join(sources) if sources else None,
        "steps": trainer.state.global_step,
        "batch size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "learning rate": args.learning_rate,
        "trainable": "lora" if hasattr(model, "peft_config") else "full",
        "seed": args.seed,
    }


def count_parameters(folder) -> int:
    """Parameters in a saved folder's safetensors files, from their headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def render_folder_card(folder, repo: str | None = None, base_models: dict | None = None) -> str:
    """The card of a saved VSM folder, from its `config.json`, `train_metrics.json` (`vsm train`) and
    `metrics.json` (`vsm eval`), whichever exist."""
    from configuration_vsm import VSMConfig

    folder = Path(folder)
    config = VSMConfig.from_pretrained(folder)
    training_log = json.loads((folder / TRAINING_FILE).read_text()) if (folder / TRAINING_FILE).is_file() else None
    metrics = json.loads((folder / METRICS_FILE).read_text()) if (folder / METRICS_FILE).is_file() else None
    training = None
    if training_log:
        training = {key: training_log.get(name) for key, name in (
            ("data", "data"), ("steps", "train_steps"), ("trainable", "trainable"), ("seed", "seed"),
            ("seconds", "train_seconds"))}
    if metrics is not None and training and "data" not in metrics:
        metrics = {**metrics, "data": training["data"]}
    return render_model_card(config, repo or folder.name, training, metrics, base_models, count_parameters(folder))
