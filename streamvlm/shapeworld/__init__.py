"""ShapeWorld: a synthetic live world with known ground truth, for measuring answer quality offline.

See ``docs/shapeworld.md``.
"""

from streamvlm.shapeworld.questions import CATEGORIES, FORWARD_TOLERANCE_S, QA, make_questions
from streamvlm.shapeworld.world import (
    COLOURS,
    SHAPES,
    Episode,
    ShapeState,
    WorldEvent,
    make_episode,
    shape_radius,
)

__all__ = [
    "SHAPES",
    "COLOURS",
    "WorldEvent",
    "ShapeState",
    "Episode",
    "make_episode",
    "shape_radius",
    "QA",
    "CATEGORIES",
    "FORWARD_TOLERANCE_S",
    "make_questions",
]
