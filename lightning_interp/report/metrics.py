"""Which way is better for each scalar the callbacks log: the one table the report's wording reads.

A metric is the last segment of a tag (``interp_gradcam/net.7/localization`` -> ``localization``). A metric not in
:data:`METRICS` gets neutral wording in the report ("changed from a to b"), never a guessed direction; so does one
whose direction is ``"neither"`` (a description of the model, not a score: sparsity, CKA to the start, a TCAV score).
Add a row here when a callback logs a new metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METRICS", "Direction", "MetricInfo", "change_words", "metric_info"]

Direction = Literal["higher", "lower", "neither"]


@dataclass(frozen=True)
class MetricInfo:
    """What the report says about a metric.

    Attributes:
        direction: ``"higher"`` or ``"lower"`` (which way is better), or ``"neither"``.
        meaning: a few words on what it measures (shown next to its name).
    """

    direction: Direction
    meaning: str = ""


METRICS: dict[str, MetricInfo] = {
    # Lightning's own (the demo modules' names)
    "val_acc": MetricInfo("higher", "validation accuracy"),
    "val_loss": MetricInfo("lower", "validation loss"),
    "train_loss": MetricInfo("lower", "training loss"),
    # maps (SaliencyCallback, GradCAMCallback)
    "localization": MetricInfo("higher", "share of the map's mass on the object"),
    "pointing_game": MetricInfo("higher", "share of samples whose map peaks on the object"),
    "concentration": MetricInfo("neither", "share of the map's mass in its top 10% of pixels"),
    "stability": MetricInfo("neither", "rank correlation with the previous epoch's maps"),
    "completeness_error": MetricInfo("lower", "how far the attributions' sum is from the score difference"),
    "share": MetricInfo("neither", "this input's share of the attribution mass (a model of several inputs)"),
    # ExplanationQualityCallback
    "deletion_auc": MetricInfo("lower", "probability left as the most relevant pixels are removed"),
    "insertion_auc": MetricInfo("higher", "probability regained as the most relevant pixels are added back"),
    "top_drop": MetricInfo("higher", "probability's fall when the map's top pixels are removed"),
    "random_drop": MetricInfo("neither", "probability's fall when as many random pixels are removed"),
    "top_drop_gain": MetricInfo("higher", "top_drop over random_drop"),
    "sanity_rank_correlation": MetricInfo("lower", "similarity to the untrained network's maps"),
    "sparseness": MetricInfo("neither", "Gini index of the map"),
    "max_sensitivity": MetricInfo("lower", "largest change of the map under small input noise"),
    "average_drop": MetricInfo("lower", "probability's fall on the image masked by its map"),
    "increase_in_confidence": MetricInfo("higher", "share of samples whose probability rises on the masked image"),
    # LinearProbeCallback
    "accuracy": MetricInfo("higher", "accuracy on held-out samples"),
    "r2": MetricInfo("higher", "held-out R²"),
    "train_accuracy": MetricInfo("neither", "accuracy on the probe's own training half"),
    "train_r2": MetricInfo("neither", "R² on the probe's own training half"),
    # RepresentationSimilarityCallback
    "cka_vs_previous": MetricInfo("neither", "CKA to the previous epoch: near 1 once the layer settled"),
    "cka_vs_start": MetricInfo("neither", "CKA to the layer before training"),
    "rsa_vs_labels": MetricInfo("neither", "how much the layer's geometry follows the labels"),
    "rsa_vs_next": MetricInfo("neither", "RDM correlation with the next layer"),
    # ActivationMapsCallback
    "dead_fraction": MetricInfo("lower", "share of the layer's units never active on the probe set"),
    "mean_activation": MetricInfo("neither", "mean output value"),
    "sparsity": MetricInfo("neither", "share of output values that are not positive"),
    # FeatureVisualizationCallback
    "objective": MetricInfo("higher", "the target's activation reached by the optimised image"),
    # ConceptCallback (TCAV)
    "tcav": MetricInfo("neither", "share of the class's samples the concept pushes up"),
    "p_value": MetricInfo("neither", "significance against random concepts (small: significant)"),
    "cav_accuracy": MetricInfo("neither", "how well the layer separates the concept from random examples"),
    # DatasetBiasCallback
    "recall": MetricInfo("higher"),
    "precision": MetricInfo("higher"),
    "worst_recall": MetricInfo("higher", "lowest per-class recall"),
    "recall_gap": MetricInfo("lower", "best minus worst per-class recall"),
    "imbalance_ratio": MetricInfo("lower", "commonest class count over the rarest"),
    "localization_lift": MetricInfo("higher", "map mass on the object over a uniform map's"),
    "min_localization_lift": MetricInfo("higher", "the lowest class's localization lift"),
    "border_lift": MetricInfo("lower", "map mass on the image border over a uniform map's"),
    "max_border_lift": MetricInfo("lower", "the highest class's border lift"),
    # CalibrationCallback
    "ece": MetricInfo("lower", "expected calibration error"),
    "ece_after_temperature": MetricInfo("lower", "expected calibration error after temperature scaling"),
    "overconfidence": MetricInfo("lower", "confidence above accuracy"),
    "mean_confidence": MetricInfo("neither"),
    "temperature": MetricInfo("neither", "the fitted temperature"),
}
"""Metric name -> :class:`MetricInfo`. Unknown metrics are described neutrally."""


def metric_info(metric: str) -> MetricInfo | None:
    """The table's row for ``metric`` (a tag's last segment), or None for a metric the table does not know.

    Example:
        >>> metric_info("deletion_auc").direction, metric_info("made_up_score")
        ('lower', None)
        >>> metric_info("share_table").meaning  # one input's share: share_<input name>
        "this input's share of the attribution mass (a model of several inputs)"
    """
    if metric not in METRICS and metric.startswith("share_"):
        return METRICS["share"]
    return METRICS.get(metric)


def change_words(metric: str, first: float, last: float) -> str:
    """How the report words a change of ``metric`` from ``first`` to ``last``: the verb and, for a metric with a
    known direction, which way is better and whether the change was good.

    Example:
        >>> change_words("deletion_auc", 0.26, 0.38)
        'rose from 0.26 to 0.38 (worse: lower is better)'
        >>> change_words("localization", 0.02, 0.05)
        'rose from 0.02 to 0.05 (better: higher is better)'
        >>> change_words("made_up_score", 0.5, 0.4)
        'changed from 0.50 to 0.40'
    """
    info = metric_info(metric)
    if info is None:
        return f"changed from {first:.2f} to {last:.2f}"
    verb = "rose" if last > first else "fell"
    text = f"{verb} from {first:.2f} to {last:.2f}"
    if info.direction == "neither":
        return text
    good = (last > first) == (info.direction == "higher")
    return f"{text} ({'better' if good else 'worse'}: {info.direction} is better)"
