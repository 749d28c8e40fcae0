"""VSMDataCollator and VSMTrainer: labels on answers only, targets in the frame, exact accumulation."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from conftest import make_batch, make_tiny_model


def test_labels_cover_the_answer_only(tiny_processor, synthetic_rows):
    row = synthetic_rows["colour"][0]
    batch = make_batch(tiny_processor, [row])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    answer_ids = tiny_processor.tokenizer(row["messages"][1]["content"] + "</s>", add_special_tokens=False)["input_ids"]
    assert labelled.tolist() == answer_ids
    assert (batch["input_ids"][0] == tiny_processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 64  # one raster scan of 8 x 8 patches
    # The instruction comes before the image (docs/design.md).
    ids = batch["input_ids"][0].tolist()
    first_image = ids.index(tiny_processor.tokenizer.convert_tokens_to_ids("<image>"))
    instruction_ids = tiny_processor.tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
    assert ids[2 : 2 + len(instruction_ids)] == instruction_ids and first_image > 2 + len(instruction_ids) - 1


def test_targets_are_drawn_on_the_square_frame(tiny_processor):
    from PIL import Image

    # A 40 x 80 (h x w) image whose target is its right half: on the 64 x 64 frame that is
    # columns 32..63 of rows 0..31 (the image fills the top half of the frame).
    image = Image.new("RGB", (80, 40))
    row = {"id": "half", "image": image, "masks": [[[40, 0, 80, 0, 80, 40, 40, 40]]], "ignore": [[]],
           "boxes": [], "messages": [{"role": "user", "content": "segment the right half"},
                                     {"role": "assistant", "content": "It is <SEG>."}]}
    loc = dict(row, id="box", masks=[], ignore=[], boxes=[[40, 0, 80, 40]],
               messages=[{"role": "user", "content": "where is it"}, {"role": "assistant", "content": "<loc>."}])
    batch = make_batch(tiny_processor, [row, loc])
    mask = batch["gt_masks"][0][0]
    assert mask.shape == (64, 64)
    assert mask[:32, 32:].float().mean() > 0.95 and mask[:, :31].sum() == 0 and mask[33:].sum() == 0
    assert torch.allclose(batch["gt_boxes"][1], torch.tensor([[0.75, 0.25, 0.5, 0.5]]))


def test_mismatched_targets_name_the_sample(tiny_processor, synthetic_rows):
    row = dict(synthetic_rows["colour"][0], id="sample-7")
    row["masks"] = row["masks"] * 2
    row["ignore"] = row["ignore"] * 2
    with pytest.raises(ValueError, match="sample-7: the text has 1 <SEG> and 0 <loc> tokens but 2 masks"):
        make_batch(tiny_processor, [row])


def test_text_only_rows_mix_with_image_rows(tiny_processor, synthetic_rows):
    text_only = {"id": "t", "image": None, "masks": [], "ignore": [], "boxes": [],
                 "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]}
    batch = make_batch(tiny_processor, [synthetic_rows["colour"][0], text_only])
    assert batch["pixel_values"].shape[0] == 1
    outputs = make_tiny_model()(**batch)
    assert torch.isfinite(outputs.loss) and outputs.pred_masks[1].shape[0] == 0


def train_one_step(rows, processor, batch_size, accumulation, tmp_path):
    from modeling_vsm import VSMDataCollator, VSMTrainer

    model = make_tiny_model(seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to=[], remove_unused_columns=False,
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = VSMTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         data_collator=VSMDataCollator(processor))
    trainer.train()
    return model, trainer


def test_gradient_accumulation_equals_a_big_batch(tiny_processor, synthetic_rows, tmp_path):
    """2 x batch 2 with accumulation gives the same update as batch 4 (SGD, no clipping)."""
    rows = [synthetic_rows[kind][0] for kind in ("colour", "loc", "vqa", "size")]
    big, big_trainer = train_one_step(rows, tiny_processor, 4, 1, tmp_path / "big")
    small, small_trainer = train_one_step(rows, tiny_processor, 2, 2, tmp_path / "small")
    for (name, p_big), p_small in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(p_big, p_small, atol=1e-6, rtol=1e-4), name
    big_log, small_log = big_trainer.state.log_history[0], small_trainer.state.log_history[0]
    for part in ("loss", "ce_loss", "mask_dice_loss", "det_loss"):
        assert small_log[part] == pytest.approx(big_log[part], rel=1e-3), part


def test_trainer_requires_raw_columns(tiny_processor, tmp_path):
    from modeling_vsm import VSMDataCollator, VSMTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        VSMTrainer(model=make_tiny_model(), args=args, data_collator=VSMDataCollator(tiny_processor))


# ---- evaluation during training -------------------------------------------------------------------


def eval_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], remove_unused_columns=False,
                  use_cpu=True, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_evaluate_reports_teacher_forced_giou_and_ciou(tiny_processor, synthetic_rows, tmp_path):
    """`evaluate()` scores the masks decoded at the gold `<SEG>`s with LISA's gIoU / cIoU (`metrics.reason_seg_iou`)."""
    import torch.nn.functional as F

    from modeling_vsm import VSMDataCollator, VSMTrainer
    from modeling_vsm.metrics import reason_seg_iou

    rows = [synthetic_rows[kind][i] for kind in ("colour", "vqa", "loc", "size") for i in range(2)]
    model = make_tiny_model(seed=3)
    trainer = VSMTrainer(model=model, args=eval_args(tmp_path), eval_dataset=Dataset.from_list(rows),
                         data_collator=VSMDataCollator(tiny_processor))
    metrics = trainer.evaluate()
    batch = make_batch(tiny_processor, rows)
    with torch.no_grad():
        outputs = model.eval()(**batch)
    predictions, references = [], []
    for logits, target in zip(outputs.pred_masks, batch["gt_masks"]):
        for mask_logits, mask in zip(logits, target):
            predictions.append(F.interpolate(mask_logits[None, None], size=mask.shape, mode="bilinear")[0, 0])
            references.append(mask)
    expected = reason_seg_iou(predictions, references)
    assert metrics["eval_num_masks"] == expected["num_masks"] == 4
    assert metrics["eval_giou"] == pytest.approx(expected["giou"], abs=1e-9)
    assert metrics["eval_ciou"] == pytest.approx(expected["ciou"], abs=1e-9)
    assert "eval_loss" in metrics


def test_mask_metrics_count_empty_unions_and_ignore_pixels():
    from modeling_vsm.training import teacher_forced_mask_metrics, teacher_forced_mask_stats

    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2, :2] = 5.0  # predicts 4 pixels
    target = torch.zeros(2, 4, 4, dtype=torch.uint8)
    target[0, :2, :1] = 1  # 2 pixels, both predicted: I = 2, U = 4
    target[0, 1, 1] = 255  # a predicted pixel that is ignored: U = 3
    stats = teacher_forced_mask_stats([logits, logits[:0]], [target, target[:0]])  # mask 2: empty union
    assert stats.tolist()[1] == [0, 0, 0, 0]
    metrics = teacher_forced_mask_metrics(type("P", (), {"predictions": stats.numpy()})())
    assert metrics["num_masks"] == 2
    assert metrics["giou"] == pytest.approx((2 / (3 + 1e-5) + 1.0) / 2)
    assert metrics["ciou"] == pytest.approx(2 / 3)


# ---- checkpoints and resume -------------------------------------------------------------------------


class CrashAt:
    """A callback that kills the run at the end of a step (after the checkpoint of an earlier step)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"simulated kill at step {step}")

        return _Crash()


def resumable_run(rows, processor, output_dir, seed=1, callbacks=(), resume=None):
    from modeling_vsm import VSMDataCollator, VSMTrainer

    model = make_tiny_model(seed=seed)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.01, report_to=[], remove_unused_columns=False,
        use_cpu=True, save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = VSMTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=VSMDataCollator(processor),
                         callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_resume_after_a_kill_gives_the_uninterrupted_weights(tiny_processor, synthetic_rows, tmp_path):
    """Killed after step 3 (checkpoint at 2), resumed with "latest": the same weights as 4 uninterrupted steps,
    exactly (same data order, optimizer, scheduler and RNG states; CPU kernels are deterministic)."""
    rows = [synthetic_rows[kind][i] for kind in ("colour", "loc", "vqa", "size") for i in range(2)]  # 8 rows, shuffled
    straight, straight_trainer = resumable_run(rows, tiny_processor, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        resumable_run(rows, tiny_processor, tmp_path / "killed", callbacks=[CrashAt(3)])
    assert [p.name for p in sorted((tmp_path / "killed").iterdir())] == ["checkpoint-2"]
    resumed, resumed_trainer = resumable_run(rows, tiny_processor, tmp_path / "killed", seed=7, resume="latest")
    assert resumed_trainer.state.global_step == 4
    for (name, expected), got in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(expected, got), name
    losses = lambda trainer: [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed_trainer)[-2:] == losses(straight_trainer)[-2:]


def test_half_written_checkpoint_is_never_taken_as_latest(tiny_processor, synthetic_rows, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    from modeling_vsm.training import latest_checkpoint, resolve_resume

    rows = [synthetic_rows["colour"][i] for i in range(4)]
    resumable_run(rows, tiny_processor, tmp_path)
    # A run killed while writing checkpoint-6: the folder exists, its weights are cut short.
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()[:1000])
    (partial / "trainer_state.json").write_text("{}")
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-6")  # transformers' own choice would be wrong
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    with pytest.raises(ValueError, match="checkpoint is incomplete"):
        resolve_resume(str(partial), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path / "elsewhere")
    _, trainer = resumable_run(rows, tiny_processor, tmp_path, resume="latest")  # already at step 4: nothing to do
    assert trainer.state.global_step == 4 and not partial.exists()


# ---- multi-process ----------------------------------------------------------------------------------


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAIN_ARGS = ["train", "--max-steps", "2", "--train-samples", "4", "--no-eval", "--save-steps", "0",
              "--warmup-steps", "0", "--learning-rate", "0.05", "--optim", "sgd", "--max-grad-norm", "0"]  # the update is the gradient


def run_command(command, output_dir):
    import os
    import subprocess

    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((output_dir / "train_log.json").read_text())["log_history"]
    return load_file(output_dir / "model.safetensors"), log


@pytest.fixture(scope="module")
def one_process_run(tiny_processor, tmp_path_factory):
    """`vsm train` with batch 4 on 4 samples, from a saved model (the runs skip training the tiny tokenizer)."""
    import sys

    folder = tmp_path_factory.mktemp("ddp")
    make_tiny_model(seed=3).save_pretrained(folder / "base")
    tiny_processor.save_pretrained(folder / "base")
    command = [sys.executable, "-m", "modeling_vsm.cli", *TRAIN_ARGS, "--model", str(folder / "base"), "--batch-size", "4",
               "--output-dir", str(folder / "one")]
    return folder / "base", *run_command(command, folder / "one")


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(launcher, one_process_run, tmp_path):
    """`torchrun --nproc_per_node=2 vsm train` and `accelerate launch` with examples/accelerate/ddp.yaml (gloo on
    CPU, batch 2 each) == `vsm train` with batch 4: the loss denominators (tokens, masks, boxes) are summed over
    processes, so the update is the global batch's. 4 samples: every step sees all of them in both runs."""
    import sys

    base, expected, expected_log = one_process_run
    launch = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate" / "ddp.yaml"),
                       "--num_processes=2", "--main_process_port=29518"],
    }[launcher]
    command = [*launch, "-m", "modeling_vsm.cli", *TRAIN_ARGS, "--model", str(base), "--batch-size", "2",
               "--output-dir", str(tmp_path / "two")]
    got, log = run_command(command, tmp_path / "two")
    initial = load_file(base / "model.safetensors")
    moved = 0
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, atol=1e-6, rtol=1e-5, msg=name)
        moved += not torch.equal(weight, initial[name])
    assert moved > len(expected) // 2  # the runs trained
    for entry_one, entry_two in zip(expected_log, log):
        for part in ("loss", "ce_loss", "mask_dice_loss", "det_loss"):
            if part in entry_one:
                assert entry_two[part] == pytest.approx(entry_one[part], rel=1e-4), part


def test_long_llava_conversations_are_cut_and_training_stays_finite(tmp_path):
    """A conversation 3x the tiny LM's positions is cut from its end: training sees finite losses, and the cut
    samples are counted per source in train_metrics.json (a cut answer's case: the next test)."""
    import json

    from PIL import Image

    from configuration_vsm import VSMConfig
    from modeling_vsm.cli import main

    positions = VSMConfig.from_preset("tiny").text_config.max_position_embeddings
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    long_answer = " ".join(["the red shape is on the left of the picture"] * (3 * positions // 9))
    turns = [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": long_answer}]
    entries = [{"id": f"long{k}", "image": "a.png", "conversations": turns} for k in range(4)]
    (tmp_path / "long.json").write_text(json.dumps(entries))
    output = tmp_path / "run"
    assert main(["train", "--data", f"llava:{tmp_path / 'long.json'}@{tmp_path / 'images'}", "--max-steps", "2",
                 "--batch-size", "4", "--train-samples", "4", "--no-eval", "--save-steps", "0", "--output-dir", str(output)]) == 0
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert metrics["max_length"] == positions and math.isfinite(metrics["train_loss"])
    assert sum(metrics["truncated_samples"].values()) >= 4 and not metrics["dropped_long_samples"]


def test_the_collator_never_cuts_an_image_or_an_answer(tiny_processor, synthetic_rows):
    from modeling_vsm.training import VSMDataCollator

    rows = synthetic_rows["colour"][:2]
    full = VSMDataCollator(tiny_processor)(rows)
    first_seg = int((full["input_ids"] == tiny_processor.seg_token_id).nonzero()[:, 1].min())
    collator = VSMDataCollator(tiny_processor, max_length=first_seg)  # every row's <SEG> is cut: both leave
    with pytest.raises(ValueError, match="longer than .* positions"):
        collator(rows)
    assert sum(collator.dropped.values()) == 2
    within_image = VSMDataCollator(tiny_processor, max_length=10)  # inside the image block
    with pytest.raises(ValueError, match="would lose its image"):
        within_image(rows)
