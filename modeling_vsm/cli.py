"""The `vsm` command line: train, predict, eval, bench, ...

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
TRAINABLE_CHOICES = ("heads", "lora", "qlora", "full")  # modeling_vsm.training.TRAINABLE_CHOICES (not imported: heavy)
# The tiny preset's recipe: from scratch on the synthetic data (docs/design.md). 3800 steps take about the time
# 3000 took when the LM read each image twice (4200 ran 604 s end to end, over the 10 minutes; issue note, session
# 11). With two scans, 3000 steps gave held-out gIoU 0.903 / 0.885 (seeds 0 / 1) vs 0.905 / 0.865 at 3300, and
# 2300 steps 0.81 (issue notes, sessions 5 and 7).
# Learning rate 7e-4: gIoU / cIoU / kind 0.931 / 0.881 / 0.797 and 0.895 / 0.832 / 0.658 (seeds 0 / 1); 1e-3 gave
# 0.903 / 0.838 / 0.685 and 0.885 / 0.791 / 0.623, 2e-3 0.746 / 0.682 / 0.491 (issue note, session 8).
TINY_RECIPE = {
    "max_steps": 3800,
    "batch_size": 16,
    "learning_rate": 7e-4,
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "train_samples": 20000,
    "eval_samples": 500,
}
NUM_OVERLAYS = 8
VERIFY_ZOOM_HELP = ("look again at each box above --confidence-high in a crop this many times its size; only a box that "
                    "passes ends the search (not SEAL's: off by default; docs/search.md)")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import (through `transformers.Trainer`) about an optional CPU kernel package, and
    # `kernels` (which transformers >= 5.25 loads it with) that it skips its Hub trust check when offline.
    for noisy in ("bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
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
    train.add_argument("--data", default="synthetic",
                       help="data spec: synthetic, reasonseg:PATH, refcoco:PATH[@IMAGES], llava:PATH[@IMAGES], a+b (README: Data)")
    train.add_argument("--data-weights", help="sampling weights of the parts of a mixture --data a+b+c, e.g. 9,3,1")
    train.add_argument("--streaming", action="store_true", help="read the training data lazily (data sets larger than memory)")
    train.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    train.add_argument("--max-steps", type=int, default=TINY_RECIPE["max_steps"])
    train.add_argument("--batch-size", type=int, default=TINY_RECIPE["batch_size"])
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=TINY_RECIPE["learning_rate"])
    train.add_argument("--train-samples", type=int, default=TINY_RECIPE["train_samples"])
    train.add_argument("--eval-samples", type=int, default=TINY_RECIPE["eval_samples"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    # What trains, how, and checkpoints (modeling_vsm.training).
    train.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="full",
                       help="full: everything; heads: projections, heads and the <SEG>/<loc> rows (backbones frozen); "
                            "lora / qlora: LoRA on the LM (qlora: 4-bit NF4 LM) + projections, heads and token rows")
    train.add_argument("--warmup-steps", type=int, default=TINY_RECIPE["warmup_steps"])
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    train.add_argument("--optim", default="adamw_torch_fused",
                       help="transformers optimizer name: adamw_torch, sgd, paged_adamw_8bit (QLoRA on a GPU), ...")
    train.add_argument("--lora-rank", type=int, default=16)
    train.add_argument("--lora-alpha", type=int, default=32)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument("--loss-weights", help="override the config's loss weights, e.g. ce=1,bce=2,dice=0.5,iou=0,det=0.1")
    train.add_argument("--lr-lm", type=float, help="learning rate of the LM, vision tower and token rows (default: --learning-rate)")
    train.add_argument("--lr-projector", type=float, help="learning rate of the projections (default: --learning-rate)")
    train.add_argument("--lr-heads", type=float, help="learning rate of the SAM and box heads (default: --learning-rate)")
    train.add_argument("--max-length", type=int, help="most positions per sample (default: the LM's max_position_embeddings); "
                       "longer samples are cut from the end, or left out when their <SEG> / <loc> answer would be cut")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute LM and vision activations in backward")
    train.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps into OUTPUT_DIR/checkpoints (0: never)")
    train.add_argument("--save-total-limit", type=int, default=2, help="keep this many checkpoints")
    train.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                       help="resume from a checkpoint folder, or the newest complete one in OUTPUT_DIR/checkpoints")
    train.add_argument("--eval-steps", type=int, default=0,
                       help="teacher-forced gIoU / cIoU on the held-out split every N steps (0: only at the end)")
    train.set_defaults(handler=run_train)

    predict = commands.add_parser("predict", help="answer one prompt about one image")
    predict.add_argument("--model", required=True)
    predict.add_argument("--image", required=True)
    predict.add_argument("--prompt", required=True)
    predict.add_argument("--output", help="write the result JSON here (default: print it)")
    predict.add_argument("--overlay", help="write a PNG with the masks and boxes drawn on the image")
    predict.add_argument("--max-new-tokens", type=int, default=24)
    predict.set_defaults(handler=run_predict)

    search = commands.add_parser("search", help="find a small target in a large image: SEAL's visual search (modeling_vsm.search)")
    search.add_argument("--model", required=True, help="a saved VSM with <loc> heads (e.g. a converted SEAL)")
    search.add_argument("--image", required=True)
    search.add_argument("--target", required=True, help="what to find, e.g. 'the red circle'")
    search.add_argument("--output", help="write the result JSON here (default: print it)")
    search.add_argument("--overlay", help="write a PNG with the visited patches (numbered) and the final box")
    search.add_argument("--confidence-high", type=float, default=0.5, help="a box scoring above this ends the search")
    search.add_argument("--confidence-low", type=float, default=0.3, help="the best box counts as found from this score")
    search.add_argument("--minimum-size", type=int, help="smallest patch side (default: 224, or 2x a smaller model input)")
    search.add_argument("--one-at-a-time", action="store_true", help="locate one patch per forward (the original's way)")
    search.add_argument("--verify-zoom", type=float, help=VERIFY_ZOOM_HELP)
    search.set_defaults(handler=run_search)

    evaluate = commands.add_parser("eval", help="gIoU / cIoU of a saved VSM on a data spec")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--task", choices=["segmentation", "search"], default="segmentation",
                          help="search: SEAL's visual search vs one <loc> look, on --data synthetic-highres or search:PATH")
    evaluate.add_argument("--data", default="synthetic", help="any data spec `vsm train` reads (text-only rows are left out)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--num-samples", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-swap-test", action="store_true")
    evaluate.add_argument("--one-query-per-image", action="store_true",
                          help="score only the first query of each image, as LISA's validation (default: every query)")
    evaluate.add_argument("--max-new-tokens", type=int, default=24)
    evaluate.add_argument("--verify-zoom", type=float, help=f"--task search: {VERIFY_ZOOM_HELP}")
    evaluate.add_argument("--output", required=True, help="metrics JSON path (per-sample JSONL goes beside it)")
    evaluate.set_defaults(handler=run_eval)

    build = commands.add_parser("build", help="compose a VSM from pretrained VLM, SAM and OWL-ViT checkpoints")
    build.add_argument("--vlm", required=True, help="Hub id or folder: JanusForConditionalGeneration or LlavaForConditionalGeneration")
    build.add_argument("--sam", required=True, help="Hub id or folder of a SamModel")
    build.add_argument("--detector", help="Hub id or folder of an OwlViTForObjectDetection (needed for 'detector')")
    build.add_argument("--dense-feature-source", default="shared", choices=["shared", "lm", "detector", "sam"])
    build.add_argument("--dtype", choices=sorted(BUILD_DTYPES), default="float32")
    build.add_argument("--output-dir", required=True)
    build.set_defaults(handler=run_build)

    convert = commands.add_parser("convert", help="a published LISA or SEAL checkpoint -> a VSM folder (modeling_vsm.convert)")
    convert.add_argument("--from", dest="source", required=True, choices=["lisa", "seal"],
                         help="lisa: LISA-7B-v1, LISA-7B-v1-explanatory, LISA-13B-llama2-v1, LISA++; seal: seal_vsm_7b")
    convert.add_argument("--checkpoint", required=True, help="the original folder or its Hub id")
    convert.add_argument("--output-dir", required=True, help="the VSM folder to write (must not exist, or be empty)")
    convert.add_argument("--vision-tower", help="the CLIP tower's folder or Hub id (default: the checkpoint's mm_vision_tower)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="dtype of the saved weights (SAM's prompt encoder and mask decoder stay float32)")
    convert.set_defaults(handler=run_convert)

    convert = commands.add_parser("convert-refs", help="convert refer's refs(unc).p pickle ONCE to JSON / parquet "
                                  "(unpickling runs code from the file: only for a file you trust)")
    convert.add_argument("--input", required=True, help="refs(unc).p, refs(google).p or refs(umd).p")
    convert.add_argument("--output", required=True, help="refs.json or refs.parquet, next to instances.json")
    convert.set_defaults(handler=run_convert_refs)

    push = commands.add_parser("push", help="upload a saved VSM folder to the Hugging Face Hub (hub_cards.push)")
    push.add_argument("--model", required=True, help="a saved VSM folder (vsm train / vsm build / save_pretrained)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created when missing; default: main)")
    push.add_argument("--commit-message")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    push.add_argument("--no-card", action="store_true", help="upload README.md as it is instead of re-rendering it")
    push.set_defaults(handler=run_push)

    demo = commands.add_parser("demo", help="a local Gradio app: image + instruction -> answer, masks, boxes")
    demo.add_argument("--model", default=DEFAULT_OUTPUT_DIR, help=f"a saved VSM folder (default: {DEFAULT_OUTPUT_DIR})")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(handler=run_demo)

    bench = commands.add_parser("bench", help="latency, memory and FLOPs of every dense-feature source vs bare transformers")
    bench.add_argument("--preset", default="tiny", help="model shapes (random weights): tiny, janus-pro-1b, ...")
    bench.add_argument("--model", help="a saved VSM folder (e.g. a converted LISA): its shapes instead of a preset's; "
                                       "its own source runs its weights")
    bench.add_argument("--output", required=True, help="report JSON path (the PNG plot goes beside it)")
    bench.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    bench.add_argument("--runs", type=int, default=3, help="timed runs per measurement (the median is reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (after one more call that counts FLOPs)")
    bench.add_argument("--new-tokens", type=int, default=8, help="tokens of the text-only generate comparison")
    bench.add_argument("--mask-counts", default="1,4,8", help="K of the K-masks-in-one-call comparison")
    bench.add_argument("--sources", default="shared,lm,detector,sam", help="dense-feature sources to measure")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    bench.set_defaults(handler=run_bench)
    return parser


# ---- train ------------------------------------------------------------------------------------


def run_train(args) -> None:
    import torch
    from transformers import TrainingArguments, set_seed

    from configuration_vsm import VSMConfig
    from hub_cards import render_model_card
    from processing_vsm import VSMProcessor

    from .data import load_data_spec, parse_data_weights, with_images
    from .modeling_vsm import VSMForCausalLM
    from .training import VSMDataCollator, VSMTrainer, learnable_rows, resolve_resume

    set_seed(args.seed)
    check_train_args(args)
    data_weights = parse_data_weights(args.data_weights) if args.data_weights else None
    output_dir = Path(args.output_dir)
    if args.model and args.trainable == "qlora":
        model, processor = None, load_processor(args.model)  # the model loads with a 4-bit LM in prepare_trainable
    elif args.model:
        model, processor = load_model_and_processor(args.model)
    else:
        config = VSMConfig.from_preset(args.preset)
        processor = VSMProcessor.from_preset(args.preset)
        model = VSMForCausalLM(config)
    image_size = processor.image_processor.image_size
    started = time.time()
    train_data = load_data_spec(args.data, split="train", seed=args.seed, num_samples=args.train_samples, image_size=image_size,
                                weights=data_weights, streaming=args.streaming)
    train_data = learnable_rows(train_data, processor)
    eval_data = None
    if args.eval_steps or not args.no_eval:
        eval_data = with_images(load_data_spec(args.data, split="validation", seed=args.seed, num_samples=args.eval_samples,
                                               image_size=image_size))
    lm_positions = (model.config if model is not None else VSMConfig.from_pretrained(args.model)).text_config.max_position_embeddings
    model, parameter_counts = prepare_trainable(args, model, output_dir)
    logging.info(f"training {parameter_counts[0] / 1e6:.2f}M of {parameter_counts[1] / 1e6:.2f}M parameters "
                 f"(--trainable {args.trainable}) on {'streamed' if args.streaming else len(train_data)} samples ({args.data}) "
                 f"for {args.max_steps} steps of {args.batch_size}")
    checkpoint_dir = output_dir / "checkpoints"
    resume = resolve_resume(args.resume, checkpoint_dir)
    on_cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        optim=args.optim,
        max_grad_norm=args.max_grad_norm,
        weight_decay=TINY_RECIPE["weight_decay"],
        lr_scheduler_type="cosine",
        logging_steps=max(1, min(100, args.max_steps // 10)),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or None,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps or None,
        per_device_eval_batch_size=args.batch_size,
        activation_checkpointing=args.gradient_checkpointing,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,  # torchrun on CPU
        disable_tqdm=False,
    )
    learning_rates = {"lm": args.lr_lm, "projector": args.lr_projector, "heads": args.lr_heads}
    collator = VSMDataCollator(processor, max_length=args.max_length or lm_positions)
    trainer = VSMTrainer(model=model, args=training_args, train_dataset=train_data, data_collator=collator,
                         eval_dataset=eval_data if args.eval_steps else None, learning_rates=learning_rates)
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - started
    model = save_trained_model(args, trainer, output_dir)
    if model is None:
        return  # under torchrun / accelerate, process 0 writes the folder and evaluates
    processor.save_pretrained(output_dir)
    logging.info(f"saved the model and processor to {output_dir}")
    metrics = {"train_loss": result.training_loss, "train_steps": result.global_step, "train_seconds": round(train_seconds, 1),
               "data": args.data, "seed": args.seed, "trainable": args.trainable,
               "trainable_parameters": parameter_counts[0], "total_parameters": parameter_counts[1],
               "train_samples_per_second": result.metrics.get("train_samples_per_second"),
               "max_length": collator.max_length, "truncated_samples": dict(collator.truncated),
               "dropped_long_samples": dict(collator.dropped)}
    for kind, counts in (("cut to --max-length", collator.truncated), ("left out (answer or image past --max-length)",
                                                                         collator.dropped)):
        if counts:
            logging.info(f"long samples {kind}: " + ", ".join(f"{source} {count}" for source, count in counts.items()))
    (output_dir / "train_log.json").write_text(json.dumps({"metrics": metrics, "log_history": trainer.state.log_history}, indent=2))
    summary = None
    if not args.no_eval:
        summary = write_evaluation(model, processor, eval_data, output_dir / "metrics.json", batch_size=32, swap_test=True,
                                   extra={"data": args.data, "split": "validation"})
        metrics.update({f"eval_{k}": v for k, v in summary.items() if not isinstance(v, (dict, list, str))})
        print_summary(summary)
    metrics["total_seconds"] = round(time.time() - started, 1)
    (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    training = {"base": args.model or f"preset {args.preset} (random init)", "data": args.data, "steps": result.global_step,
                "batch size": args.batch_size * args.gradient_accumulation_steps * training_args.world_size,
                "learning rate": args.learning_rate, "trainable": args.trainable,
                "seed": args.seed, "seconds": round(train_seconds, 1)}
    (output_dir / "README.md").write_text(render_model_card(model, output_dir.name, training, summary))
    print(f"checkpoint: {output_dir}")
    if not args.no_eval:
        print(f"metrics:    {output_dir / 'metrics.json'}")
        print(f"overlays:   {output_dir / 'overlays'}")


def check_train_args(args) -> None:
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "lora_rank", "lora_alpha"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_steps", "eval_steps", "save_total_limit", "warmup_steps"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "lr_lm", "lr_projector", "lr_heads", "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and not (0 <= value < math.inf):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.max_length is not None and args.max_length < 1:
        raise CLIError(f"--max-length must be >= 1, got {args.max_length}")
    if args.eval_steps and args.no_eval:
        raise CLIError("--eval-steps evaluates on the held-out split, which --no-eval turns off")


def prepare_trainable(args, model, output_dir: Path):
    """Applies `--loss-weights` and `--trainable`; returns the model to train and its (trainable, total)
    parameter counts. LoRA / QLoRA from a preset first write its initial weights to OUTPUT_DIR/base, the
    base the adapter is merged into at the end; QLoRA then reloads that base (or `--model`) with a 4-bit LM."""
    import torch

    from .training import apply_lora, count_parameters, freeze_for_heads, load_quantized, parse_loss_weights, set_loss_weights

    loss_weights = parse_loss_weights(args.loss_weights) if args.loss_weights else {}
    lora_kwargs = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    is_main_process = int(os.environ.get("RANK", "0")) == 0
    if args.trainable in ("lora", "qlora") and not args.model and is_main_process:
        model.save_pretrained(lora_base_dir(args, output_dir))
    if args.trainable == "qlora":  # `model` is None with --model: never loaded in full precision
        if not args.model and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CLIError("--trainable qlora with several processes needs --model (a saved base every process can read)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
        model = load_quantized(lora_base_dir(args, output_dir), device)
    set_loss_weights(model.config, loss_weights)
    if args.trainable == "heads":
        freeze_for_heads(model)
    elif args.trainable in ("lora", "qlora"):
        model = apply_lora(model, quantized=args.trainable == "qlora", **lora_kwargs)
    return model, count_parameters(model)


def lora_base_dir(args, output_dir: Path) -> Path:
    return Path(args.model) if args.model else output_dir / "base"


def save_trained_model(args, trainer, output_dir: Path):
    """Saves the trained model to `output_dir` as a plain VSM folder (loads with `trust_remote_code=True`) and
    returns it for evaluation on process 0 (None on the others). LoRA / QLoRA: the adapter goes to
    OUTPUT_DIR/adapter and the folder holds the full-precision base with the adapter merged in.

    Every process takes part: under FSDP or DeepSpeed ZeRO-3 the weights are gathered from their shards."""
    from .modeling_vsm import VSMForCausalLM
    from .training import LOSS_WEIGHT_FIELDS, fold_token_rows, merge_adapter, name_adapter_base, set_loss_weights

    fold_token_rows(trainer.accelerator.unwrap_model(trainer.model))  # `--trainable heads`: a plain model again
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # collective: gathers sharded weights
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.trainable in ("lora", "qlora"):
        adapter_dir = output_dir / "adapter"
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        name_adapter_base(adapter_dir, lora_base_dir(args, output_dir))
        logging.info(f"saved the LoRA adapter to {adapter_dir} (base: {lora_base_dir(args, output_dir).resolve()})")
        weights = {field: getattr(model.config, field) for field in LOSS_WEIGHT_FIELDS.values()}
        model = merge_adapter(VSMForCausalLM.from_pretrained(lora_base_dir(args, output_dir)), adapter_dir)
        set_loss_weights(model.config, weights)  # the run's loss weights (the base folder has the old ones)
        model.save_pretrained(output_dir)
        return model
    model.save_pretrained(output_dir, state_dict=state_dict)
    if trainer.args.world_size > 1:  # the in-memory copy may be a shard: read back what was saved
        model = VSMForCausalLM.from_pretrained(output_dir)
    return model


# ---- predict ----------------------------------------------------------------------------------


def run_predict(args) -> None:
    from .evaluation import draw_overlay, predict, prompt_text

    model, processor = load_model_and_processor(args.model)
    image = open_image(args.image)
    prompt = prompt_text(processor, [{"role": "user", "content": args.prompt}])
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
    """The answer, its masks as COCO RLE (compressed counts: `pycocotools.mask.decode` reads them), boxes and scores."""
    from .data import rle_encode

    masks = []
    for mask in result["masks"].cpu().numpy():
        ys, xs = mask.nonzero()
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if xs.size else None
        masks.append({"rle": rle_encode(mask), "bbox": bbox, "area": int(mask.sum())})
    return {
        "text": result["text"],
        "masks": masks,
        "boxes": [[round(v, 2) for v in box] for box in result["boxes"].tolist()],
        "scores": [round(v, 4) for v in result["scores"].tolist()],
    }


# ---- search -----------------------------------------------------------------------------------


def run_search(args) -> None:
    from .search import draw_search, visual_search

    model, processor = load_model_and_processor(args.model)
    image = open_image(args.image)
    result = visual_search(model, processor, image, args.target, confidence_high=args.confidence_high,
                           confidence_low=args.confidence_low, minimum_size=args.minimum_size,
                           batch_children=not args.one_at_a_time, verify_zoom=args.verify_zoom)
    text = json.dumps(result, indent=2)
    if args.output:
        write_text(args.output, text)
        print(f"search: {'found' if result['success'] else 'not found'}, box {result['box']}, score {result['score']}, "
              f"{len(result['path'])} patches, {result['num_calls']} model calls, {result['seconds']} s -> {args.output}")
    else:
        print(text)
    if args.overlay:
        ensure_parent(args.overlay)
        draw_search(image, result).save(args.overlay)
        print(f"overlay: {args.overlay}")


def run_search_eval(args) -> None:
    from .search import SearchSettings
    from .search_eval import evaluate_search, highres_scenes, load_search_folder

    num_samples = args.num_samples or 20
    if args.data == "synthetic-highres":
        rows = highres_scenes(num_samples, seed=args.seed)
    elif args.data.startswith("search:"):
        rows = load_search_folder(args.data.partition(":")[2])[:num_samples]
    else:
        raise CLIError(f"--task search reads --data synthetic-highres or search:PATH, got {args.data!r}")
    model, processor = load_model_and_processor(args.model)
    report, records = evaluate_search(model, processor, rows, SearchSettings(verify_zoom=args.verify_zoom))
    report = {"data": args.data, **report}
    output = Path(args.output)
    ensure_parent(output)
    output.write_text(json.dumps(report, indent=2))
    with open(output.with_suffix(".samples.jsonl"), "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for name in ("search", "one_shot", "search_small", "one_shot_small"):
        part = report[name]
        if part:
            print(f"{name:15s} success {part['success_rate']:.3f}  calls {part['mean_calls']:.1f}  seconds {part['mean_seconds']:.2f}")
    print(f"batched vs one patch per forward: {report['batched_speedup']}x ({report['batched_speedup_samples']} searches)")
    print(f"metrics: {output}")


# ---- eval -------------------------------------------------------------------------------------


def run_eval(args) -> None:
    from .data import collect_skipped, load_data_spec, with_images

    if args.task == "search":
        return run_search_eval(args)
    model, processor = load_model_and_processor(args.model)
    with collect_skipped() as skipped:
        data = with_images(load_data_spec(args.data, split=args.split, seed=args.seed, num_samples=args.num_samples,
                                          image_size=processor.image_processor.image_size))
    summary = write_evaluation(model, processor, data, Path(args.output), args.batch_size, swap_test=not args.no_swap_test,
                               one_query_per_image=args.one_query_per_image, skipped_at_load=skipped,
                               max_new_tokens=args.max_new_tokens, extra={"data": args.data, "split": args.split})
    print_summary(summary)
    print(f"metrics: {args.output}")
    print(f"samples: {Path(args.output).with_suffix('.samples.jsonl')}")
    print(f"gallery: {Path(args.output).parent / 'overlays' / 'index.html'}")


def write_evaluation(model, processor, data, output_path: Path, batch_size: int, swap_test: bool,
                     one_query_per_image: bool = False, skipped_at_load=None, max_new_tokens: int = 24,
                     extra: dict | None = None) -> dict:
    """Evaluates, then writes the summary JSON (with `extra`, e.g. the data spec), the per-sample JSONL beside it
    and a gallery of the best and worst cases (`overlays/*.png` + `overlays/index.html`)."""
    from .evaluation import evaluate_segmentation, write_gallery

    summary, records = evaluate_segmentation(model, processor, data, batch_size=batch_size, swap_test=swap_test,
                                             max_new_tokens=max_new_tokens, one_query_per_image=one_query_per_image,
                                             skipped_at_load=skipped_at_load)
    summary = {**(extra or {}), **summary}
    ensure_parent(output_path)
    output_path.write_text(json.dumps(summary, indent=2))
    with open(output_path.with_suffix(".samples.jsonl"), "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    write_gallery(model, processor, data, records, output_path.parent / "overlays", NUM_OVERLAYS)
    return summary


def print_summary(summary: dict) -> None:
    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    print(f"gIoU {fmt(summary.get('giou'))}  cIoU {fmt(summary.get('ciou'))}  on {summary.get('num_samples')} "
          f"segmentation queries; <SEG> emitted {fmt(summary.get('seg_emission_rate'))}; chance {fmt(summary.get('chance_iou'))}")
    groups = {**(summary.get("per_type") or {}),
              **{f"all {name}s": part for name, part in (summary.get("by_is_sentence") or {}).items()}}
    for name, part in groups.items():
        spread = f" +-{part['giou_stderr']:.3f}" if part.get("giou_stderr") is not None else ""
        print(f"  {name:16s} gIoU {fmt(part['giou'])}{spread}  cIoU {fmt(part['ciou'])}  chance {fmt(part['chance_iou'])}  n={part['num_samples']}")
    if "box_accuracy" in summary:
        print(f"<loc> box accuracy@0.5 {fmt(summary['box_accuracy'])}  mean IoU {fmt(summary.get('box_miou'))}")
    if "swap_iou" in summary:
        print(f"swap test: IoU(own instruction, swapped instruction) {fmt(summary['swap_iou'])} (1.0 = instruction ignored)")
    if summary.get("num_unreadable"):
        print(f"unreadable: {summary['num_unreadable']} samples could not be read; see `unreadable` / `skipped_at_load`")


# ---- convert ----------------------------------------------------------------------------------


def run_convert(args) -> None:
    from .convert import convert

    output = convert(args.source, args.checkpoint, args.output_dir, vision_tower=args.vision_tower, dtype=args.dtype)
    print(f"VSM converted from {args.source.upper()} {args.checkpoint} saved to {output}")
    print(f"try: vsm predict --model {output} --image IMAGE --prompt 'What is in this image? Please output segmentation mask.'")


# ---- convert-refs -----------------------------------------------------------------------------


def run_convert_refs(args) -> None:
    from .data import convert_refs_pickle

    count = convert_refs_pickle(args.input, args.output)  # logs the trust warning first
    print(f"refs: {count} written to {args.output}")


# ---- build ------------------------------------------------------------------------------------

BUILD_DTYPES = {"float32", "bfloat16", "float16"}


def run_build(args) -> None:
    import torch

    from hub_cards import attach_model_card
    from modeling_vsm import VSMForCausalLM
    from processing_vsm import VSMProcessor

    components = {"vlm": args.vlm, "sam": args.sam, "detector": args.detector,
                  "dense_feature_source": args.dense_feature_source}
    processor = VSMProcessor.from_components(**components)
    model = VSMForCausalLM.from_components(**components, dtype=getattr(torch, args.dtype))
    # Recorded in config.json for the model card (hub_cards), which also writes README.md on save.
    model.config.base_models = {"vlm": args.vlm, "sam": args.sam, "detector": args.detector}
    output_dir = Path(args.output_dir)
    attach_model_card(model, repo=output_dir.name, training={"built from": "pretrained components, not trained yet"})
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"VSM ({args.dense_feature_source}, {num_parameters / 1e6:.1f}M parameters, <SEG>={model.config.seg_token_index}, "
          f"<loc>={model.config.loc_token_index}) saved to {output_dir}")


# ---- push -------------------------------------------------------------------------------------


def run_push(args) -> None:
    from hub_cards.push import push_folder

    pushed = push_folder(args.model, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, token=args.token, write_card=not args.no_card)
    print(f"pushed {len(pushed['files'])} files to {pushed['url']} (revision {pushed['revision']}): "
          + ", ".join(pushed["files"]))


# ---- demo -------------------------------------------------------------------------------------


def run_demo(args) -> None:
    from .demo import build_demo

    model, processor = load_model_and_processor(args.model)
    app = build_demo(model, processor, max_new_tokens=args.max_new_tokens, title=f"VSM demo: {Path(args.model).name}")
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, ssr_mode=False)


# ---- bench ------------------------------------------------------------------------------------


def run_bench(args) -> None:
    from .bench import run_benchmark, write_report
    from .modeling_vsm import check_device_map

    def split(text):
        return [item.strip() for item in text.split(",") if item.strip()]

    if args.device:
        check_device_map(args.device)
    ensure_parent(args.output)
    try:
        mask_counts = [int(k) for k in split(args.mask_counts)]
    except ValueError:
        raise CLIError(f"--mask-counts must be comma-separated integers, got {args.mask_counts!r}") from None
    report = run_benchmark(preset=args.preset, dtypes=split(args.dtypes), runs=args.runs, warmup=args.warmup,
                           new_tokens=args.new_tokens, mask_counts=mask_counts, sources=split(args.sources),
                           device=args.device, partial_output=f"{args.output}.partial", model_dir=args.model)
    json_path, plot_path = write_report(report, args.output)
    Path(f"{args.output}.partial").unlink(missing_ok=True)
    for dtype, entry in report["dtypes"].items():
        for source, result in entry["sources"].items():
            if "error" in result:
                print(f"{dtype:5s} {source:9s} error: {result['error']}")
            else:
                print(f"{dtype:5s} {source:9s} vsm {result['vsm']['latency_s']:.3f} s  bare {result['bare']['latency_s']:.3f} s"
                      f"  ({result['time_vs_bare']:.3f}x)")
    print(f"report: {json_path}")
    print(f"plot:   {plot_path}")


# ---- shared -----------------------------------------------------------------------------------


def load_processor(path):
    from processing_vsm import VSMProcessor

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved VSM folder (no config.json)")
    return VSMProcessor.from_pretrained(path)


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
