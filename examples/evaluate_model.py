"""Evaluate a saved VSM: gIoU / cIoU (LISA's definitions) on a data spec, from Python.

    python examples/evaluate_model.py --model outputs/vsm-tiny --data synthetic --split validation --num-samples 100

The same numbers as `vsm eval --model DIR --data SPEC --output metrics.json`, which also writes per-sample
results and a gallery. The masks are then scored a second time with the local `evaluate` module, which loads
offline: `evaluate.load(modeling_vsm.metrics.EVALUATE_MODULE_PATH)`.
"""

import argparse
import json

import evaluate
import numpy as np

from modeling_vsm.cli import load_model_and_processor
from modeling_vsm.data import load_data_spec, sample_mask
from modeling_vsm.evaluation import evaluate_segmentation, predict, prompt_text, union_mask
from modeling_vsm.metrics import EVALUATE_MODULE_PATH


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/vsm-tiny")
    parser.add_argument("--data", default="synthetic", help="synthetic, reasonseg:PATH, refcoco:PATH, a+b")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args.model)
    data = load_data_spec(args.data, split=args.split, num_samples=args.num_samples,
                          image_size=processor.image_processor.image_size)
    summary, records = evaluate_segmentation(model, processor, data, batch_size=args.batch_size, swap_test=False)
    print(json.dumps({k: summary[k] for k in ("giou", "ciou", "num_samples", "seg_emission_rate", "by_is_sentence")}, indent=2))

    # The same gIoU / cIoU through the `evaluate` module, from the masks themselves.
    metric = evaluate.load(EVALUATE_MODULE_PATH)
    rows = [data[r["index"]] for r in records if "giou" in r]
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        results = predict(model, processor, [r["image"] for r in batch], [prompt_text(processor, r["messages"]) for r in batch])
        for row, result in zip(batch, results):
            width, height = row["image"].size
            reference = sample_mask(row, 0, height, width)  # (H, W): 0 / 1 / 255 (ignore)
            predicted = union_mask(result["masks"])
            metric.add(prediction=predicted if predicted is not None else np.zeros((height, width), bool), reference=reference)
    print("evaluate module:", metric.compute())


if __name__ == "__main__":
    main()
