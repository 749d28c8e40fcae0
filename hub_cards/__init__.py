"""Model cards for saved VSM folders, rendered from the config, the training run and the evaluation."""

from pathlib import Path
from string import Template

TEMPLATE_PATH = Path(__file__).with_name("model_card.md")


def describe_tower(config) -> str:
    return (f"`{config.model_type}`, hidden {config.hidden_size}, {config.num_hidden_layers} layers"
            + (f", {config.image_size} px / patch {config.patch_size}" if hasattr(config, "patch_size") else ""))


def render_model_card(model, repo: str, training: dict | None = None, metrics: dict | None = None) -> str:
    """The README.md of a saved VSM: its parts and sizes, a usage snippet, the training run and metrics."""
    config = model.config
    decoder = config.sam_config.mask_decoder_config
    training_text = "\n".join(f"- {key}: `{value}`" for key, value in (training or {}).items()) or "Not recorded."
    if metrics:
        rows = [f"| {name} | {value:.4f} |" for name, value in metrics.items() if isinstance(value, float)]
        evaluation_text = "| metric | value |\n|---|---|\n" + "\n".join(rows)
        per_type = metrics.get("per_type") or {}
        if per_type:
            evaluation_text += "\n\n| query type | gIoU | chance |\n|---|---|---|\n" + "\n".join(
                f"| {name} | {part['giou']:.3f} | {part['chance_iou'] if part['chance_iou'] is None else round(part['chance_iou'], 3)} |"
                for name, part in per_type.items())
    else:
        evaluation_text = "Not evaluated."
    return Template(TEMPLATE_PATH.read_text()).substitute(
        title=Path(repo).name,
        repo=repo,
        vision=describe_tower(config.vision_config),
        language=describe_tower(config.text_config) + f", vocabulary {config.text_config.vocab_size}",
        decoder_width=decoder.hidden_size,
        decoder_layers=decoder.num_hidden_layers,
        dense_feature_source=config.dense_feature_source,
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        training=training_text,
        evaluation=evaluation_text,
    )
