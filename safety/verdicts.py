"""What the safety check decided about each image of a batch, and what the caller keeps.

An image is dropped for one of two reasons, and the user is told which: stage 2 judged it unsafe, or stage 2
failed on it (out of memory, a CUDA error), so nobody judged it and it is dropped anyway (fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from errors import UserError

ALL_IMAGES_UNSAFE_MESSAGE = "All generated images contained NSFW content. Try running it again with a different prompt."
# Stage 2's (Falconsai/nsfw_image_detection) one label for a safe image; any other label is unsafe.
SAFE_LABEL = "normal"
REASON_LIMIT = 120  # characters of an error shown to the user; the log has it whole

Item = TypeVar("Item")


@dataclass(frozen=True)
class ImageVerdict:
    """One image's path through the two stages. `index` is its position in the generated batch. Errors are
    "Type: message" strings (safety/checker.py), e.g. "torch.OutOfMemoryError: CUDA out of memory. ..."."""

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

    @property
    def failed(self) -> bool:
        """Dropped because the checker failed on it, not because it was judged unsafe."""
        return self.checked and self.stage1_flagged and self.stage2_error is not None

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

    @property
    def failed_indices(self) -> list[int]:
        """The dropped images nobody judged: the checker failed on them."""
        return [verdict.index for verdict in self.verdicts if verdict.failed]

    def summary(self) -> str:
        """The counts for the prediction log, e.g. "3 image(s), 2 flagged by stage 1, 2 dropped (1 judged unsafe,
        1 because the checker failed on it)"."""
        flagged, dropped, failed = (sum(v.stage1_flagged for v in self.verdicts), len(self.dropped_indices),
                                    len(self.failed_indices))
        line = f"{len(self.verdicts)} image(s), {flagged} flagged by stage 1, {dropped} dropped"
        if failed:
            line += f" ({dropped - failed} judged unsafe, {failed} because the checker failed on it)"
        return line

    def failure_note(self) -> str | None:
        """For the log when the checker failed on some images but others were returned; None otherwise."""
        failed = self.failed_indices
        if not failed or not self.kept_indices:
            return None
        return (f"The safety checker failed on {len(failed)} of {len(self.verdicts)} image(s) "
                f"(indices {failed}: {self._reasons()}); they were dropped unjudged, the other "
                f"{len(self.kept_indices)} returned.")

    def kept_or_raise(self, images: Sequence[Item]) -> list[tuple[int, Item]]:
        """(index, image) for the kept images, in batch order; indices of dropped images leave gaps.

        Raises UserError when every image was dropped: ALL_IMAGES_UNSAFE_MESSAGE when each was judged unsafe,
        else a message saying the checker failed, on what, and what to try.
        """
        if len(images) != len(self.verdicts):
            raise ValueError(f"the report covers {len(self.verdicts)} images, not {len(images)}")
        kept = [(index, images[index]) for index in self.kept_indices]
        if images and not kept:
            raise UserError(self._failed_message() if self.failed_indices else ALL_IMAGES_UNSAFE_MESSAGE)
        return kept

    def _failed_message(self) -> str:
        failed = [verdict for verdict in self.verdicts if verdict.failed]
        unsafe = len(self.dropped_indices) - len(failed)
        others = f" (the other {unsafe} contained NSFW content)" if unsafe else ""
        if any(is_out_of_memory(verdict.stage2_error) for verdict in failed):
            advice = "Try fewer num_outputs or a smaller size, or run it again."
        else:
            advice = "Try running it again."
        return (f"The safety checker failed ({self._reasons()}) on {len(failed)} image(s), so they were not "
                f"returned{others}. {advice}")

    def _reasons(self) -> str:
        return "; ".join(dict.fromkeys(short_error(v.stage2_error) for v in self.verdicts if v.failed))


def is_out_of_memory(error: str) -> bool:
    """torch.OutOfMemoryError, or an allocator's "out of memory" raised as a plain error (cuBLAS, NCCL)."""
    return "OutOfMemoryError" in error or "out of memory" in error.lower()


def short_error(error: str) -> str:
    """The error's type and first sentence, for the user: torch's OOM message goes on for several sentences
    about the process's memory. A message naming a path shows only the type (no server-side paths to users)."""
    kind, _, message = error.partition(": ")
    first = message.splitlines()[0].split(". ")[0].rstrip(".") if message.strip() else ""
    if not first or "/" in first or "\\" in first:
        return kind
    text = f"{kind}: {first}"
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"
