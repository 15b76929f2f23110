"""What the map callbacks share for object detectors: the detection transform a map callback binds to the samples
it explains, and the text beside a detection grid's rows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_interp.methods import DetectionScores, DetectionTarget

__all__ = ["BoundDetections", "DetectionTarget", "detection_row_texts"]


class BoundDetections:
    """The ``output_transform`` a map callback gives its methods for a detector: the
    :class:`~lightning_interp.methods.DetectionScores` of the samples explained last (bound before each
    explanation, on their clean inputs), under one identity, so an explainer built once per fit keeps working."""

    def __init__(self) -> None:
        self.current: DetectionScores | None = None

    def bind(self, scores: DetectionScores) -> None:
        self.current = scores

    def __call__(self, output: object) -> Tensor:
        if self.current is None:
            raise RuntimeError("No detections are bound yet: the callback binds them before explaining.")
        return self.current(output)

    def boxes(self, size: tuple[int, int]) -> Tensor:
        """(B, H, W) bool: each bound sample's explained box as a mask on an (H, W) input (empty when none)."""
        assert self.current is not None
        return self.current.masks(size)


def detection_row_texts(
    labels: Tensor, scores: Tensor, boxes: Tensor, found: Tensor, class_names: Sequence[str] | None
) -> list[str]:
    """Beside each row: the sample, the explained detection's class and score on the clean image, and its box
    (``x1,y1-x2,y2`` in pixels); ``no detection`` where the sample has none.

    Example:
        >>> import torch
        >>> texts = detection_row_texts(torch.tensor([2, -1]), torch.tensor([0.875, 0.0]),
        ...                             torch.tensor([[1.0, 2.0, 30.4, 40.6], [0, 0, 0, 0]]),
        ...                             torch.tensor([True, False]), ["bg", "disc", "square"])
        >>> [text.splitlines() for text in texts]
        [['#0', 'det square', 'score 0.875', 'box 1,2-30,41'], ['#1', 'no detection']]
    """
    rows = []
    for i in range(labels.shape[0]):
        if not bool(found[i]):
            rows.append(f"#{i}\nno detection")
            continue
        c = int(labels[i])
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        x1, y1, x2, y2 = (round(float(v)) for v in boxes[i])
        rows.append(f"#{i}\ndet {name}\nscore {float(scores[i]):.3g}\nbox {x1},{y1}-{x2},{y2}")
    return rows
