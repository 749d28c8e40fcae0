"""`evaluate` module for VSM's reasoning-segmentation metrics: gIoU and cIoU as LISA reports them.

Loads offline from its folder: `evaluate.load(modeling_vsm.metrics.EVALUATE_MODULE_PATH)` (or the folder's
path as a string). The computation is `modeling_vsm.metrics.reason_seg_iou`, called as is, so both give the
same numbers; this file only declares the inputs for `evaluate`.
"""

import datasets
import evaluate

from modeling_vsm.metrics import reason_seg_iou

_DESCRIPTION = """gIoU (mean over masks of I / (U + 1e-5), a mask with an empty union counting 1.0) and cIoU
(sum of I / sum of U) for reasoning / referring segmentation, as LISA (Lai et al. 2023) defines them.
Reference pixels labelled 255 are left out of I and U; a prediction is a bool mask or logits, foreground where > 0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) masks: bool, 0 / 1, or float logits (foreground where > 0).
    references: list of (H, W) masks with values 0, 1 and 255 (ignore), same shapes pairwise.
Returns:
    giou (float), ciou (float), num_masks (int).
Example:
    >>> metric = evaluate.load("modeling_vsm/evaluate_modules/vsm_reason_seg")
    >>> metric.compute(predictions=[[[1, 0]]], references=[[[1, 1]]])
    {'giou': 0.49999750001249993, 'ciou': 0.5, 'num_masks': 1}
"""

_CITATION = """@inproceedings{lai2024lisa,
  title={LISA: Reasoning Segmentation via Large Language Model},
  author={Lai, Xin and Tian, Zhuotao and Chen, Yukang and Li, Yanwei and Yuan, Yuhui and Liu, Shu and Jia, Jiaya},
  booktitle={CVPR},
  year={2024}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VsmReasonSeg(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.List(datasets.Value("float32"))),  # (H, W)
                    "references": datasets.List(datasets.List(datasets.Value("int64"))),  # (H, W)
                }
            ),
            reference_urls=["https://github.com/dvlab-research/LISA"],
        )

    def _compute(self, predictions, references):
        return reason_seg_iou(predictions, references)
