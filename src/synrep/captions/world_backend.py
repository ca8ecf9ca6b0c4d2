"""The ``world`` caption backend: captions of the attribute world (:mod:`synrep.world`), no model.

Each caption names a garment class and one combination of the world's attributes in the exact wording the
world's generator was trained on ("a small dark striped sneaker tilted left in the top left"). A concept's
captions walk its 360 attribute combinations in a seeded order, so up to 360 captions per concept are
distinct and every attribute value is about equally common (exactly, at 360). The concept's class is its
dataset label (``label`` in the fashion-mnist concept list), named as the world names it.
"""

from __future__ import annotations

from ..datasets import FASHION_MNIST_CLASSES
from ..world import planned_caption
from .requests import CaptionRequest


class WorldCaptionBackend:
    name = "world"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        out = []
        for r in requests:
            label = r.concept.label
            class_name = FASHION_MNIST_CLASSES[label] if label is not None and 0 <= label < len(FASHION_MNIST_CLASSES) \
                else r.concept.name
            # a retried request (attempt > 0) gets another combination (exact de-duplication drops a repeat)
            out.append(planned_caption(class_name, self.seed, r.index + 997 * r.attempt))
        return out

    def close(self) -> None:
        pass
