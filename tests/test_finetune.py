"""What trains (`--trainable heads|lora|qlora|full`), per-part learning rates, loss-weight overrides,
gradient checkpointing, and peft adapters: saved, reloaded and merged into a folder that loads with
`trust_remote_code=True`."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from conftest import make_batch, make_tiny_model, run_in_clean_process



def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(model, processor, rows, tmp_path, learning_rates=None, **overrides):
    from modeling_vsm import VSMDataCollator, VSMTrainer

    trainer = VSMTrainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=Dataset.from_list(rows),
                         data_collator=VSMDataCollator(processor), learning_rates=learning_rates)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def rows(synthetic_rows):
    return [synthetic_rows[kind][i] for kind in ("colour", "loc") for i in range(2)]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_loss_weights_parse_and_override(tiny_processor, rows):
    from modeling_vsm.training import parse_loss_weights, set_loss_weights

    assert parse_loss_weights("ce=1, bce=2,dice=0.5") == {"ce_loss_weight": 1.0, "bce_loss_weight": 2.0, "dice_loss_weight": 0.5}
    for bad, message in (("ce", "NAME=VALUE"), ("mask=1", "NAME one of"), ("ce=x", "not a number"),
                         ("ce=-1", ">= 0"), ("ce=nan", ">= 0"), (" , ", "No loss weight")):
        with pytest.raises(ValueError, match=message):
            parse_loss_weights(bad)
    model = make_tiny_model(seed=1).eval()
    batch = make_batch(tiny_processor, rows)
    with torch.no_grad():
        before = model(**batch)
        set_loss_weights(model.config, parse_loss_weights("ce=0,bce=0,dice=1,det=0"))
        after = model(**batch)
    assert after.loss.item() == pytest.approx(before.mask_dice_loss.item(), rel=1e-6)


def test_heads_mode_trains_projections_heads_and_token_rows_only(tiny_processor, rows, tmp_path):
    from modeling_vsm.training import count_parameters, freeze_for_heads, parameter_part

    from modeling_vsm.training import fold_token_rows

    model = make_tiny_model(seed=1)
    before = snapshot(model)
    total_before, plain_keys = sum(p.numel() for p in model.parameters()), model.state_dict().keys()
    freeze_for_heads(model)
    assert model.state_dict().keys() == plain_keys  # the wrapped rows save under the plain keys
    seg, loc = model.config.seg_token_index, model.config.loc_token_index
    hidden = model.config.text_config.hidden_size
    trainable, total = count_parameters(model)
    full_modules = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".rows")]
    assert trainable == sum(p.numel() for p in full_modules) + 2 * 2 * hidden  # + 2 rows of embed_tokens and lm_head
    assert total == total_before and trainable < total / 2
    # AdamW with weight decay: frozen rows must not decay either.
    trainer = train(model, tiny_processor, rows, tmp_path, optim="adamw_torch", weight_decay=0.1)
    states = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() * t.element_size() for t in states) <= 2 * trainable_bytes  # Adam's two moments of what trains
    vocabulary = model.config.text_config.vocab_size
    assert max(t.numel() for t in states) < vocabulary * hidden  # no state for the embedding or lm_head as a whole
    fold_token_rows(model)
    after = snapshot(model)
    for name, old in before.items():
        changed = not torch.equal(old, after[name])
        if name.startswith(("model.vision_tower", "model.language_model.layers", "model.language_model.norm")):
            assert not changed, name
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows_changed = (old != after[name]).any(dim=1).nonzero().flatten().tolist()
            assert rows_changed and set(rows_changed) <= {seg, loc}, (name, rows_changed)
        else:
            assert parameter_part(name) in ("projector", "heads"), name
    for name in ("model.multi_modal_projector.linear_1.weight", "text_hidden_fcs_seg.0.weight", "lm_to_dense.0.weight",
                 "mask_decoder.transformer.layers.0.mlp.lin1.weight", "box_head.dense0.weight", "class_head.dense0.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_learning_rate_per_part(tiny_processor, rows, tmp_path):
    """lr 0 for the LM part leaves it unchanged while the projections and heads move."""
    model = make_tiny_model(seed=1)
    before = snapshot(model)
    trainer = train(model, tiny_processor, rows, tmp_path, learning_rates={"lm": 0.0, "heads": 0.2})
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {0.0, 0.05, 0.2}  # lm, projector, heads
    after = snapshot(model)
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.vision_tower.embeddings.patch_embedding.weight"):
        assert torch.equal(before[name], after[name]), name
    for name in ("model.multi_modal_projector.linear_1.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight"):
        assert not torch.equal(before[name], after[name]), name
    from modeling_vsm import VSMTrainer
    from modeling_vsm.training import parameter_part

    assert parameter_part("base_model.model.mask_decoder.modules_to_save.default.iou_token.weight") == "heads"
    assert parameter_part("base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight") == "projector"
    assert parameter_part("base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight") == "lm"
    with pytest.raises(ValueError, match="unknown parts"):
        VSMTrainer(model=model, args=training_args(tmp_path), learning_rates={"vision": 1.0})


def test_gradient_checkpointing_gives_the_same_gradients(tiny_processor, rows):
    batch = make_batch(tiny_processor, rows)
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model(seed=2).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.language_model.layers[0].gradient_checkpointing
            assert model.model.vision_tower.encoder.layers[0].gradient_checkpointing
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def lora_outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return {"logits": out.logits, "masks": torch.cat(out.pred_masks), "boxes": torch.cat(out.pred_boxes)}


def test_lora_targets_the_language_model_and_reloads_identically(tiny_processor, rows, tmp_path):
    from peft import PeftModel

    from modeling_vsm.training import apply_lora, count_parameters

    model = apply_lora(make_tiny_model(seed=1))
    lora_modules = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert lora_modules and all(".language_model.layers." in name for name in lora_modules)
    assert len(lora_modules) == 2 * 7  # tiny: 2 layers x q, k, v, o, gate, up, down
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in name for name in trainable)
    assert any("mask_decoder.modules_to_save" in name for name in trainable)
    assert any("embed_tokens.token_adapter.trainable_tokens_delta" in name for name in trainable)
    assert any("lm_head.token_adapter.trainable_tokens_delta" in name for name in trainable)
    assert count_parameters(model)[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)

    train(model, tiny_processor, rows, tmp_path / "run", learning_rates={"lm": 0.5})
    model.save_pretrained(tmp_path / "adapter")
    batch = make_batch(tiny_processor, rows)
    expected = lora_outputs(model, batch)
    reloaded = PeftModel.from_pretrained(make_tiny_model(seed=1), str(tmp_path / "adapter"))
    untrained = lora_outputs(make_tiny_model(seed=1), batch)
    got = lora_outputs(reloaded, batch)
    for key in expected:
        assert not torch.allclose(expected[key], untrained[key]), key  # training changed the outputs
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


MERGED_SCRIPT = """
    folder, batch_path, out_path = sys.argv[2:5]
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "VSMForCausalLM"
    batch = load_file(batch_path)
    with torch.no_grad():
        out = model(**batch)
    save_file({"logits": out.logits, "masks": torch.cat(out.pred_masks)}, out_path)
"""


def test_merged_lora_folder_loads_with_remote_code(tiny_processor, rows, tmp_path):
    from safetensors.torch import load_file, save_file

    from modeling_vsm.training import apply_lora

    model = apply_lora(make_tiny_model(seed=1))
    train(model, tiny_processor, rows, tmp_path / "run", learning_rates={"lm": 0.5})
    batch = make_batch(tiny_processor, rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    expected = lora_outputs(model, inputs)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "VSMForCausalLM"
    merged.save_pretrained(tmp_path / "merged")
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "batch.safetensors")
    run_in_clean_process(MERGED_SCRIPT, [tmp_path / "merged", tmp_path / "batch.safetensors", tmp_path / "out.safetensors"], tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    # Merging adds B @ A into each weight: float rounding only.
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["masks"], expected["masks"], atol=1e-3, rtol=1e-4)


def bitsandbytes_4bit_reason():
    from modeling_vsm.training import check_4bit_support

    try:
        check_4bit_support(torch.device("cpu"))
    except (ImportError, RuntimeError) as error:
        return str(error)
    return None


def test_qlora_quantises_the_lm_only_trains_and_reloads_identically(tiny_processor, rows, tmp_path):
    reason = bitsandbytes_4bit_reason()
    if reason:
        pytest.skip(reason)
    import bitsandbytes as bnb
    from peft import PeftModel

    from modeling_vsm.training import apply_lora, load_quantized

    make_tiny_model(seed=1).save_pretrained(tmp_path / "base")
    device = torch.device("cpu")
    model = load_quantized(tmp_path / "base", device)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.model.language_model.layers[0].mlp.down_proj.weight.quant_type == "nf4"
    for name, module in model.named_modules():
        if not name.startswith("model.language_model"):
            assert not isinstance(module, bnb.nn.Linear4bit), name
    model = apply_lora(model, quantized=True)
    train(model, tiny_processor, rows, tmp_path / "run", learning_rates={"lm": 0.5})
    model.save_pretrained(tmp_path / "adapter")
    batch = make_batch(tiny_processor, rows)
    expected = lora_outputs(model, batch)
    reloaded = PeftModel.from_pretrained(load_quantized(tmp_path / "base", device), str(tmp_path / "adapter"))
    got = lora_outputs(reloaded, batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


PEFT_SCRIPT = """
import sys
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file, save_file

adapter, batch_path, output = sys.argv[2:5]
model = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True).eval()
with torch.no_grad():
    outputs = model(**load_file(batch_path))
save_file({"logits": outputs.logits.contiguous(), "masks": torch.cat(outputs.pred_masks).contiguous()}, output)
"""


@pytest.fixture(scope="module")
def cli_lora_run(tmp_path_factory):
    from modeling_vsm.cli import main

    output = tmp_path_factory.mktemp("lora-run") / "out"
    code = main(["train", "--max-steps", "2", "--batch-size", "2", "--train-samples", "4", "--no-eval", "--save-steps", "0",
                 "--trainable", "lora", "--lora-rank", "4", "--loss-weights", "dice=1.5", "--output-dir", str(output)])
    assert code == 0
    return output


def test_cli_lora_run_saves_an_adapter_and_a_merged_folder(cli_lora_run):
    import json

    from modeling_vsm.modeling_vsm import VSMForCausalLM

    output = cli_lora_run
    assert (output / "adapter" / "adapter_config.json").is_file() and (output / "adapter" / "adapter_model.safetensors").is_file()
    merged = VSMForCausalLM.from_pretrained(output)
    assert merged.config.dice_loss_weight == 1.5
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]


def test_the_adapter_loads_with_auto_peft_model_from_any_directory_and_in_a_clean_process(cli_lora_run, tiny_processor,
                                                                                         rows, tmp_path, monkeypatch):
    """`AutoPeftModelForCausalLM.from_pretrained(ADAPTER, trust_remote_code=True)` finds the base named in
    adapter_config.json and gives the merged folder's outputs, here and where only torch, transformers and peft are."""
    import json

    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file, save_file

    from modeling_vsm.modeling_vsm import VSMForCausalLM

    adapter = cli_lora_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((cli_lora_run / "base").resolve()) and config["task_type"] == "CAUSAL_LM"
    batch = make_batch(tiny_processor, rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    merged = VSMForCausalLM.from_pretrained(cli_lora_run).eval()
    with torch.no_grad():
        expected = merged(**inputs)
    monkeypatch.chdir(tmp_path)  # another working directory
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter), trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = loaded(**inputs)
    torch.testing.assert_close(outputs.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outputs.pred_masks), torch.cat(expected.pred_masks), atol=1e-4, rtol=1e-5)
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "batch.safetensors")
    run_in_clean_process(PEFT_SCRIPT, [adapter, tmp_path / "batch.safetensors", tmp_path / "out.safetensors"], tmp_path)
    clean = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(clean["logits"], expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean["masks"], torch.cat(expected.pred_masks), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss-weights", "ce=oops"], "is not a number"),
        (["--trainable", "heads", "--lr-heads", "-1"], "--lr-heads must be a finite number >= 0"),
        (["--resume"], "no complete checkpoint"),
        (["--eval-steps", "2"], "--no-eval"),
    ],
)
def test_cli_bad_training_flags_exit_with_one_line(argv, message, tmp_path, capsys):
    from modeling_vsm.cli import main

    code = main(["train", "--max-steps", "1", "--batch-size", "2", "--train-samples", "2", "--no-eval",
                 "--output-dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_checkpoints_resume_and_evaluates_during_training(tmp_path):
    """`--save-steps` writes complete checkpoints, `--resume` (latest) continues to a higher `--max-steps`,
    `--eval-steps` logs teacher-forced gIoU / cIoU, and the log states the trainable parameter count."""
    import json

    from modeling_vsm.cli import main

    output = tmp_path / "out"
    common = ["train", "--batch-size", "2", "--train-samples", "6", "--eval-samples", "3", "--no-eval", "--save-steps", "2",
              "--trainable", "heads", "--output-dir", str(output)]
    assert main([*common, "--max-steps", "2"]) == 0
    checkpoint = output / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "vsm_checkpoint_complete.json").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"][0]["loss"] = 123.0  # a marker: the resumed run's history starts from this file
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    common.remove("--no-eval")
    assert main([*common, "--max-steps", "4", "--resume", "--eval-steps", "2"]) == 0
    log = json.loads((output / "train_log.json").read_text())
    assert log["metrics"]["train_steps"] == 4
    losses = [(e["step"], e["loss"]) for e in log["log_history"] if "loss" in e]
    assert [step for step, _ in losses] == [1, 2, 3, 4] and losses[0][1] == 123.0
    evals = [e for e in log["log_history"] if "eval_giou" in e]
    assert [e["step"] for e in evals] == [4] and 0 <= evals[0]["eval_ciou"] <= 1 and evals[0]["eval_num_masks"] > 0
    trainable, total = log["metrics"]["trainable_parameters"], log["metrics"]["total_parameters"]
    assert 0 < trainable < total / 2
