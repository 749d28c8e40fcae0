#!/usr/bin/env bash
# The main job: set up, train the tiny preset on the built-in synthetic data, evaluate it on the
# held-out split, run one prediction, and leave checkpoint + metrics + overlays in outputs/.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything here is built locally: never wait on the (unreachable) Hugging Face Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash scripts/setup.sh
OUT="${VSM_OUTPUT_DIR:-outputs/vsm-tiny}"
VSM=.venv/bin/vsm
start=$(date +%s)
"$VSM" train --preset tiny --data synthetic --output-dir "$OUT" "$@"
# One prediction on a held-out image (test split, never trained on), with its own instruction.
PROMPT=$(.venv/bin/python - "$OUT/example.png" <<'PY'
import sys
from modeling_vsm.data import load_synthetic
row = next(r for r in load_synthetic("test", num_samples=50) if r["query_type"] == "sentence")
row["image"].save(sys.argv[1])
print(row["messages"][0]["content"])
PY
)
echo "predict: $PROMPT"
"$VSM" predict --model "$OUT" --image "$OUT/example.png" --prompt "$PROMPT" \
  --output "$OUT/prediction.json" --overlay "$OUT/prediction.png"
echo "done in $(( $(date +%s) - start )) s (set-up excluded). Results:"
echo "  checkpoint  $OUT"
echo "  metrics     $OUT/metrics.json"
echo "  overlays    $OUT/overlays/ and $OUT/prediction.png"
