"""Import-time choices for the ML libraries, made once before diffusers and transformers load.

Every prediction log used to start with lines no user can act on. Their causes, and what is done here:
- transformers 5 names its torchvision image processors `CLIPImageProcessor`, `SiglipImageProcessor`, ...; without
  torchvision it falls back to the `...Pil` classes and says so each time diffusers imports one. This build has
  no torchvision (the PIL processors give the same results), so the PIL classes are chosen explicitly, under the
  names diffusers imports, before it imports them.
- torchao (for go_fast) loads its CUDA kernel libraries and looks for triton when it is imported, which transformers
  and diffusers do eagerly. On a torch without CUDA those kernels cannot load ("Failed to load ..._C*.so"), triton
  is absent, and nothing here needs either. torchao 0.18 also registers two Enums with a torch API that torch now
  calls deprecated, and diffusers' torchao glue looks for tensor classes torchao 0.18 renamed ("Unable to import
  `torchao` Tensor objects"; it only matters for loading torchao-serialised checkpoints, which we never do).
  So torchao is imported here once, and exactly those known records are dropped during that import, only when
  their condition holds (no CUDA for the kernel lines). Every other warning, and all of them after, still shows.
- Loading bars and diffusers' advice to developers are noise in a prediction's log: both libraries' progress bars
  are off and diffusers says only errors (our own log has one line per phase instead).
"""

from __future__ import annotations

import importlib.util
import logging
import re

_done = False

_PIL_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor", "ViTImageProcessor")


def prepare_libraries() -> None:
    """Idempotent; call before the first diffusers or transformers import."""
    global _done
    if _done:
        return
    _done = True
    _import_torchao()  # first: looking up transformers' image processors imports torchao too
    _choose_pil_image_processors()
    _quiet_loading_logs()


def _quiet_loading_logs() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _choose_pil_image_processors() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return  # the default (torchvision) processors work; keep them
    import sys

    import transformers

    for name in _PIL_PROCESSORS:
        pil_class = getattr(transformers, f"{name}Pil")
        # transformers swaps its lazy module in sys.modules while loading; set the name on the one imports see
        setattr(sys.modules["transformers"], name, pil_class)


class _DropKnownImportNoise(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _import_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        return
    import torch

    patterns = [
        r"^<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass",  # torchao 0.18 on torch >= 2.12
        r"^Unable to import `torchao` Tensor objects",  # diffusers' glue vs torchao 0.18's renamed classes
    ]
    if not torch.cuda.is_available():
        patterns += [r"^Failed to load .*torchao/_C\w*\.\S*so: ", r"^Warning: Detected no triton"]
    noise = _DropKnownImportNoise(patterns)
    from diffusers.utils import logging as diffusers_logging

    loggers = [
        logging.getLogger(name) for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
    ] + [diffusers_logging.get_logger("diffusers.quantizers.torchao.torchao_quantizer")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        import diffusers.quantizers.torchao.torchao_quantizer  # noqa: F401  (imports torchao)
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
