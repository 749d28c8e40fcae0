#!/usr/bin/env bash
# Fine-tune a saved VSM on ReasonSeg with LoRA on its language model (heads, projections and the <SEG> / <loc>
# rows train in full), then score it on ReasonSeg's val split the way LISA does (one query per image) and on
# every query.
#
#   bash examples/finetune_reasonseg_lora.sh MODEL_DIR REASONSEG_DIR OUTPUT_DIR [more `vsm train` options]
#
# MODEL_DIR: a saved VSM (`vsm build` from Janus-Pro + SAM + OWL-ViT, or a released VSM). REASONSEG_DIR: LISA's
# ReasonSeg folder with train/ and val/ (one JSON + one image per sample). Extra options go to `vsm train`,
# e.g. --max-steps 2000 --batch-size 8 --gradient-accumulation-steps 4 --learning-rate 3e-4 --lora-rank 16.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 MODEL_DIR REASONSEG_DIR OUTPUT_DIR [vsm train options]" >&2
  exit 2
fi
MODEL=$1 DATA=$2 OUT=$3
shift 3
VSM=${VSM:-vsm}

"$VSM" train --model "$MODEL" --data "reasonseg:$DATA" --trainable lora --output-dir "$OUT" --no-eval "$@"
# LISA's protocol: the first query of each val image; then every query (the default).
"$VSM" eval --model "$OUT" --data "reasonseg:$DATA" --split val --one-query-per-image --output "$OUT/eval_val_lisa/metrics.json"
"$VSM" eval --model "$OUT" --data "reasonseg:$DATA" --split val --output "$OUT/metrics.json"
echo "fine-tuned model: $OUT (LoRA adapter in $OUT/adapter, merged weights in $OUT)"
