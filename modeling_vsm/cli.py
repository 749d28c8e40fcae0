"""The `vsm` command line: train, predict, eval.

Every subcommand that writes results takes an output path; errors exit non-zero with one line.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT_DIR = "outputs/vsm-tiny"
# The tiny preset's recipe: from scratch on the synthetic data (DESIGN.md section 1).
TINY_RECIPE = {
    "max_steps": 3300,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "train_samples": 20000,
    "eval_samples": 500,
}
NUM_OVERLAYS = 8


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("vsm: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line, no traceback (set VSM_DEBUG=1 for one)
        if os.environ.get("VSM_DEBUG"):
            raise
        print(f"vsm {args.command}: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return 2 if isinstance(error, (CLIError, ValueError, FileNotFoundError)) else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsm", description="VSM: visual search and reasoning segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or fine-tune) a VSM, then evaluate it on the held-out split")
    train.add_argument("--preset", default="tiny", help="model shapes to build from scratch (default: tiny)")
    train.add_argument("--model", help="fine-tune this saved VSM folder instead of building a preset")
    train.add_argument("--data", default="synthetic", help="data spec: synthetic, reasonseg:PATH, a+b")
    train.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    train.add_argument("--max-steps", type=int, default=TINY_RECIPE["max_steps"])
    train.add_argument("--batch-size", type=int, default=TINY_RECIPE["batch_size"])
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=TINY_RECIPE["learning_rate"])
    train.add_argument("--train-samples", type=int, default=TINY_RECIPE["train_samples"])
    train.add_argument("--eval-samples", type=int, default=TINY_RECIPE["eval_samples"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    train.set_defaults(handler=run_train)

    predict = commands.add_parser("predict", help="answer one prompt about one image")
    predict.add_argument("--model", required=True)
    predict.add_argument("--image", required=True)
    predict.add_argument("--prompt", required=True)
    predict.add_argument("--output", help="write the result JSON here (default: print it)")
    predict.add_argument("--overlay", help="write a PNG with the masks and boxes drawn on the image")
    predict.add_argument("--max-new-tokens", type=int, default=24)
    predict.set_defaults(handler=run_predict)

    evaluate = commands.add_parser("eval", help="gIoU / cIoU of a saved VSM on a data spec")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", default="synthetic")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--num-samples", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-swap-test", action="store_true")
    evaluate.add_argument("--output", required=True, help="metrics JSON path (per-sample JSONL goes beside it)")
    evaluate.set_defaults(handler=run_eval)
    return parser


# ---- train ------------------------------------------------------------------------------------


def run_train(args) -> None:
    import torch
    from transformers import TrainingArguments, set_seed

    from configuration_vsm import VSMConfig
    from hub_cards import render_model_card
    from processing_vsm import VSMProcessor

    from .data import load_data_spec
    from .modeling_vsm import VSMForCausalLM
    from .training import VSMDataCollator, VSMTrainer

    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if args.model:
        model, processor = load_model_and_processor(args.model)
    else:
        config = VSMConfig.from_preset(args.preset)
        processor = VSMProcessor.from_preset(args.preset)
        model = VSMForCausalLM(config)
    image_size = processor.image_processor.image_size
    started = time.time()
    train_data = load_data_spec(args.data, split="train", seed=args.seed, num_samples=args.train_samples, image_size=image_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logging.info(f"training {trainable / 1e6:.2f}M parameters on {len(train_data)} samples ({args.data}) "
                 f"for {args.max_steps} steps of {args.batch_size}")
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=TINY_RECIPE["warmup_steps"],
        weight_decay=TINY_RECIPE["weight_decay"],
        lr_scheduler_type="cosine",
        logging_steps=max(1, min(100, args.max_steps // 10)),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = VSMTrainer(model=model, args=training_args, train_dataset=train_data, data_collator=VSMDataCollator(processor))
    result = trainer.train()
    train_seconds = time.time() - started
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logging.info(f"saved the model and processor to {output_dir}")
    metrics = {"train_loss": result.training_loss, "train_steps": result.global_step, "train_seconds": round(train_seconds, 1),
               "data": args.data, "seed": args.seed}
    (output_dir / "train_log.json").write_text(json.dumps({"metrics": metrics, "log_history": trainer.state.log_history}, indent=2))
    summary = None
    if not args.no_eval:
        eval_data = load_data_spec(args.data, split="validation", seed=args.seed, num_samples=args.eval_samples, image_size=image_size)
        summary = write_evaluation(model, processor, eval_data, output_dir / "metrics.json", batch_size=32, swap_test=True)
        metrics.update({f"eval_{k}": v for k, v in summary.items() if not isinstance(v, dict)})
        print_summary(summary)
    metrics["total_seconds"] = round(time.time() - started, 1)
    (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    training = {"base": args.model or f"preset {args.preset} (random init)", "data": args.data, "steps": result.global_step,
                "batch size": args.batch_size * args.gradient_accumulation_steps, "learning rate": args.learning_rate,
                "seed": args.seed, "seconds": round(train_seconds, 1)}
    (output_dir / "README.md").write_text(render_model_card(model, output_dir.name, training, summary))
    print(f"checkpoint: {output_dir}")
    if not args.no_eval:
        print(f"metrics:    {output_dir / 'metrics.json'}")
        print(f"overlays:   {output_dir / 'overlays'}")


# ---- predict ----------------------------------------------------------------------------------


def run_predict(args) -> None:
    from .evaluation import draw_overlay, predict

    model, processor = load_model_and_processor(args.model)
    image = open_image(args.image)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"{args.prompt}\n{processor.image_token}"}], tokenize=False, add_generation_prompt=True
    )
    result = predict(model, processor, [image], [prompt], args.max_new_tokens)[0]
    payload = prediction_json(result)
    text = json.dumps(payload, indent=2)
    if args.output:
        write_text(args.output, text)
        print(f"prediction: {args.output}")
    else:
        print(text)
    if args.overlay:
        ensure_parent(args.overlay)
        draw_overlay(image, result["masks"], result["boxes"]).save(args.overlay)
        print(f"overlay:    {args.overlay}")


def prediction_json(result) -> dict:
    masks = []
    for mask in result["masks"].cpu().numpy():
        ys, xs = mask.nonzero()
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None
        masks.append({"rle": mask_to_rle(mask), "bbox": bbox, "area": int(mask.sum())})
    return {
        "text": result["text"],
        "masks": masks,
        "boxes": [[round(v, 2) for v in box] for box in result["boxes"].tolist()],
        "scores": [round(v, 4) for v in result["scores"].tolist()],
    }


def mask_to_rle(mask) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    import numpy as np

    pixels = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], pixels, [1 - pixels[-1] if pixels.size else 0]])))
    counts = np.diff(np.concatenate([[0], changes]))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


# ---- eval -------------------------------------------------------------------------------------


def run_eval(args) -> None:
    from .data import load_data_spec

    model, processor = load_model_and_processor(args.model)
    data = load_data_spec(args.data, split=args.split, seed=args.seed, num_samples=args.num_samples,
                          image_size=processor.image_processor.image_size)
    summary = write_evaluation(model, processor, data, Path(args.output), args.batch_size, swap_test=not args.no_swap_test)
    print_summary(summary)
    print(f"metrics: {args.output}")


def write_evaluation(model, processor, data, output_path: Path, batch_size: int, swap_test: bool) -> dict:
    """Evaluates, then writes the summary JSON, per-sample JSONL and overlays of best and worst cases."""
    from .evaluation import draw_overlay, evaluate_segmentation, predict, prompt_text

    summary, records = evaluate_segmentation(model, processor, data, batch_size=batch_size, swap_test=swap_test)
    ensure_parent(output_path)
    output_path.write_text(json.dumps(summary, indent=2))
    with open(output_path.with_suffix(".samples.jsonl"), "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    overlay_dir = output_path.parent / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    by_id = {row_id: i for i, row_id in enumerate(data["id"])}
    scored = sorted((r for r in records if "iou" in r), key=lambda r: r["iou"])
    chosen = [("worst", r) for r in scored[: NUM_OVERLAYS // 2]] + [("best", r) for r in scored[-(NUM_OVERLAYS // 2):]]
    for rank, (label, record) in enumerate(chosen):
        row = data[by_id[record["id"]]]
        result = predict(model, processor, [row["image"]], [prompt_text(processor, row["messages"])])[0]
        name = f"{label}_{rank:02d}_iou{record['iou']:.2f}.png"
        draw_overlay(row["image"], result["masks"], result["boxes"]).save(overlay_dir / name)
    return summary


def print_summary(summary: dict) -> None:
    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    print(f"gIoU {fmt(summary.get('giou'))}  cIoU {fmt(summary.get('ciou'))}  on {summary.get('num_samples')} "
          f"segmentation queries; <SEG> emitted {fmt(summary.get('seg_emission_rate'))}; chance {fmt(summary.get('chance_iou'))}")
    for name, part in (summary.get("per_type") or {}).items():
        print(f"  {name:16s} gIoU {fmt(part['giou'])}  cIoU {fmt(part['ciou'])}  chance {fmt(part['chance_iou'])}  n={part['num_samples']}")
    if "box_accuracy" in summary:
        print(f"<loc> box accuracy@0.5 {fmt(summary['box_accuracy'])}  mean IoU {fmt(summary.get('box_miou'))}")
    if "swap_iou" in summary:
        print(f"swap test: IoU(own instruction, swapped instruction) {fmt(summary['swap_iou'])} (1.0 = instruction ignored)")


# ---- shared -----------------------------------------------------------------------------------


def load_model_and_processor(path):
    from processing_vsm import VSMProcessor

    from .modeling_vsm import VSMForCausalLM

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved VSM folder (no config.json)")
    model = VSMForCausalLM.from_pretrained(path)
    processor = VSMProcessor.from_pretrained(path)
    model.eval()
    return model, processor


def open_image(path):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def ensure_parent(path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def write_text(path, text: str) -> None:
    ensure_parent(path)
    Path(path).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
