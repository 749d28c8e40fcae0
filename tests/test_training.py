"""VSMDataCollator and VSMTrainer: labels on answers only, targets in the frame, exact accumulation."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from conftest import make_batch, make_tiny_model


def test_labels_cover_the_answer_only(tiny_processor, synthetic_rows):
    row = synthetic_rows["colour"][0]
    batch = make_batch(tiny_processor, [row])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    answer_ids = tiny_processor.tokenizer(row["messages"][1]["content"] + "</s>", add_special_tokens=False)["input_ids"]
    assert labelled.tolist() == answer_ids
    assert (batch["input_ids"][0] == tiny_processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 64
    # The instruction comes before the image (DESIGN.md section 1).
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
