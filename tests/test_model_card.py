"""Model cards: metadata the Hub parses (model-index), a usage snippet that runs, and README.md from save_pretrained."""

import re

from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image

from conftest import make_tiny_model, run_in_clean_process
from hub_cards import render_folder_card, render_model_card

METRICS = {"data": "reasonseg:/data/ReasonSeg", "split": "val", "giou": 0.61234, "ciou": 0.5, "num_samples": 7,
           "seg_emission_rate": 1.0, "chance_iou": None, "box_accuracy": 0.25, "swap_iou": 0.1,
           "per_type": {"reasonseg": {"giou": 0.61234, "ciou": 0.5, "chance_iou": None, "num_samples": 7}},
           "by_is_sentence": {"phrase": {"giou": 0.7, "ciou": 0.6, "chance_iou": None, "num_samples": 4}}}


def test_card_metadata_parses_as_the_hub_does():
    model = make_tiny_model()
    training = {"data": "reasonseg:/data/ReasonSeg", "steps": 10, "trainable": "lora"}
    base_models = {"vlm": "deepseek-ai/Janus-Pro-1B", "sam": "facebook/sam-vit-base", "detector": "/local/owlvit"}
    text = render_model_card(model, "org/vsm-test", training, METRICS, base_models)
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation" and data.license == "apache-2.0"
    assert "custom_code" in data.tags
    assert sorted(data.base_model) == ["deepseek-ai/Janus-Pro-1B", "facebook/sam-vit-base"]  # no local paths
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"giou", "ciou", "seg_emission_rate", "box_accuracy"}  # only reported numbers
    assert results["giou"].metric_value == 0.6123 and results["giou"].dataset_type == "reasonseg"
    assert results["giou"].dataset_split == "val" and results["giou"].dataset_name == "ReasonSeg"
    # model-index round trip through huggingface_hub's own converters.
    name, parsed = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "vsm-test" and parsed == data.eval_results
    assert eval_results_to_model_index(name, parsed) == card.data.to_dict()["model-index"]
    assert all(isinstance(r, EvalResult) for r in parsed)
    # The body: the parts, dense features, training and the per-type table.
    for expected in ("| language model | deepseek-ai/Janus-Pro-1B | `llama`", f"`{model.config.dense_feature_source}`",
                     "- trainable: `lora`", "| reasonseg | 0.6123 |", "| all phrases | 0.7000 |", "| gIoU | 0.6123 |"):
        assert expected in text


def test_card_without_evaluation_has_no_model_index():
    card = ModelCard(render_model_card(make_tiny_model(), "local-folder"))
    assert card.data.eval_results is None and "Not evaluated yet" in card.text and card.data.base_model is None


def test_usage_snippet_runs_in_a_clean_process(tiny_processor, tmp_path):
    folder = tmp_path / "saved"
    model = make_tiny_model()
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    text = render_folder_card(folder, repo=str(folder))
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'from_pretrained("{folder}", trust_remote_code=True)' in snippet
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "image.png")
    run_in_clean_process(snippet + "\nassert tuple(result['masks'].shape[1:]) == (30, 40)\n", [], tmp_path)


def test_save_pretrained_of_a_trained_model_writes_the_card(tiny_processor, synthetic_rows, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from modeling_vsm import VSMDataCollator, VSMTrainer

    model = make_tiny_model()
    model.save_pretrained(tmp_path / "untrained")
    assert not (tmp_path / "untrained" / "README.md").exists()  # nothing to describe yet
    rows = synthetic_rows["colour"][:2]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True)
    VSMTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=VSMDataCollator(tiny_processor)).train()
    model.save_pretrained(tmp_path / "trained")
    card = ModelCard.load(tmp_path / "trained" / "README.md")
    assert "- steps: `1`" in card.text and "- data: `synthetic`" in card.text and "- trainable: `full`" in card.text
    assert 'from_pretrained("trained", trust_remote_code=True)' in card.text
