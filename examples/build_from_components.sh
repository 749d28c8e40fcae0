#!/usr/bin/env bash
# Build a VSM from pretrained parts: a Janus-Pro VLM (vision tower, aligner, LM), SAM (prompt encoder + mask
# decoder) and OWL-ViT (box heads), with their weights copied exactly; the new <SEG> / <loc> rows and the
# projections start untrained. Then fine-tune it (examples/finetune_reasonseg_lora.sh) before expecting masks.
#
#   bash examples/build_from_components.sh [OUTPUT_DIR] [VLM] [SAM] [DETECTOR] [DENSE_FEATURE_SOURCE]
#
# Each part is a Hub id or a local folder; the defaults download about 5 GB from the Hub.
set -euo pipefail
OUT=${1:-outputs/vsm-janus-pro-1b}
VLM=${2:-deepseek-ai/Janus-Pro-1B}
SAM=${3:-facebook/sam-vit-base}
DETECTOR=${4:-google/owlvit-base-patch16}
SOURCE=${5:-shared}  # shared | lm | detector | sam (docs/design.md)
VSM=${VSM:-vsm}

"$VSM" build --vlm "$VLM" --sam "$SAM" --detector "$DETECTOR" --dense-feature-source "$SOURCE" --output-dir "$OUT"
# The folder loads with plain transformers; its README.md lists the parts it was built from.
python "$(dirname "$0")/quick_start.py" --model "$OUT" --prompt "Please segment the dog."
