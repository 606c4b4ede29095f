"""What the safety check decided about each image of a batch, and what the caller keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from errors import UserError

ALL_IMAGES_UNSAFE_MESSAGE = "All generated images contained NSFW content. Try running it again with a different prompt."
# Stage 2's (Falconsai/nsfw_image_detection) one label for a safe image; any other label is unsafe.
SAFE_LABEL = "normal"

Item = TypeVar("Item")


@dataclass(frozen=True)
class ImageVerdict:
    """One image's path through the two stages. `index` is its position in the generated batch."""

    index: int
    checked: bool = True  # False when the checker was disabled for the request
    stage1_flagged: bool = False
    stage1_error: str | None = None  # stage 1 failed on the batch, so every image went on to stage 2
    stage2_label: str | None = None  # set only for images stage 2 classified
    stage2_error: str | None = None  # stage 2 failed on this image, which makes it unsafe

    @property
    def safe(self) -> bool:
        if not self.checked or not self.stage1_flagged:
            return True
        return self.stage2_error is None and self.stage2_label == SAFE_LABEL

    def describe(self) -> str:
        """Why the image was dropped or kept, for the prediction log."""
        if not self.checked:
            return "not checked"
        if not self.stage1_flagged:
            return "stage 1 passed it"
        first = f"stage 1 failed ({self.stage1_error})" if self.stage1_error else "stage 1 flagged it"
        if self.stage2_error is not None:
            return f"{first}, stage 2 failed ({self.stage2_error})"
        return f"{first}, stage 2 said {self.stage2_label!r}"


@dataclass(frozen=True)
class SafetyReport:
    """Verdicts in batch order (verdicts[i].index == i) and how long the check took."""

    verdicts: tuple[ImageVerdict, ...]
    seconds: float = 0.0

    @classmethod
    def unchecked(cls, count: int) -> SafetyReport:
        return cls(tuple(ImageVerdict(index, checked=False) for index in range(count)))

    @property
    def kept_indices(self) -> list[int]:
        return [verdict.index for verdict in self.verdicts if verdict.safe]

    @property
    def dropped_indices(self) -> list[int]:
        return [verdict.index for verdict in self.verdicts if not verdict.safe]

    def kept_or_raise(self, images: Sequence[Item]) -> list[tuple[int, Item]]:
        """(index, image) for the kept images, in batch order; indices of dropped images leave gaps.

        Raises UserError with ALL_IMAGES_UNSAFE_MESSAGE when every image was dropped.
        """
        if len(images) != len(self.verdicts):
            raise ValueError(f"the report covers {len(self.verdicts)} images, not {len(images)}")
        kept = [(index, images[index]) for index in self.kept_indices]
        if images and not kept:
            raise UserError(ALL_IMAGES_UNSAFE_MESSAGE)
        return kept
