"""bench/simulated_cards: the card table from the simulated GPU (tests/fixtures/simulated_gpu).

Each deployed class (predict.py) on each card (flux/fast/cards.py): setup through FluxGenerator with synthetic
weights made on the simulated card, then the fixed request list of tests/fixtures/simulated_requests.py. Prints one
markdown table per class: what setup keeps resident, where T5 waits, the simulated peak (GiB) of setup and of each
request, refusals and failures with their messages, and how many of the checks of tests/fixtures/simulated_table.py
failed. The simulation has no values, no compile and no timing: peaks and placements only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/simulated_cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="19/38/24 layers instead of 1/1/1")
    parser.add_argument("--cards", help="comma-separated short names (default: every card)")
    parser.add_argument("--classes", default="Predictor,FastPredictor,LegacyPredictor")
    parser.add_argument("--details", action="store_true", help="list every problem found")
    parser.add_argument("--card-table", action="store_true",
                        help="also README's card table: per card and class, what streams and its cost, the peaks")
    args = parser.parse_args(argv)

    import logging

    from weights.libraries import prepare_libraries

    prepare_libraries()
    logging.basicConfig(level=logging.ERROR)
    from flux.fast.cards import CARDS, card
    from tests.fixtures.simulated_requests import FULL_SIZE_REQUESTS, REQUESTS, prepare_workdir, simulated_server
    from tests.fixtures.simulated_table import markdown, violations
    from weights.synthetic.components import FULL_SIZE, Layers

    layers = FULL_SIZE if args.full_size else Layers(1, 1, 1)
    cards = [card(name.strip()) for name in args.cards.split(",")] if args.cards else list(CARDS)
    workdir = Path(tempfile.mkdtemp(prefix="simulated-cards-"))
    safety = prepare_workdir(workdir, layers)
    reports, started = [], time.perf_counter()
    requests = FULL_SIZE_REQUESTS if args.full_size else REQUESTS
    for klass in args.classes.split(","):
        served: dict = {}
        for gpu in cards:
            with simulated_server(klass, gpu, layers, workdir, safety) as server:
                reports.append(server.serve(requests, served))
            print(f"{klass} on {gpu}: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    print(markdown(reports))
    if args.card_table:
        print("\n" + card_table(reports))
    if args.details:
        for report in reports:
            for check, items in violations(report).items():
                for item in items:
                    print(f"- {report.klass} on {report.card.short}, {check}: {item}")
    print(f"\n{len(reports)} class x card runs in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


def card_table(reports: list) -> str:
    """Markdown, one row per card and class: the plan's placement (flux/fast/memory.py, real FLUX.1 sizes), what a
    dev step streams and what that costs at the host link's speed, go_fast's kernel, and the simulated peaks."""
    import torch

    from flux.fast import memory
    from flux.fast.kernels import kernel_for
    from flux.fast.sizes import real_sizes
    from flux.variants import default_resident

    rows = ["| card | class | resident | streamed per dev step: GiB, s at 25 GB/s (bf16 / go_fast) | go_fast kernel | "
            "peak 1 MP dev | peak 4 x 1440² | peak 4 x 1 MP go_fast |", "|---|---|---|---|---|---|---|---|"]
    sizes_by_kernel: dict = {}
    for report in reports:
        gpu, (go_fast_default, go_fast_input) = report.card, memory.DEPLOYED[report.klass]
        kernel = kernel_for(gpu.capability, torch.bfloat16)
        sizes = sizes_by_kernel.setdefault(kernel.name, real_sizes(kernel=kernel))
        plan = memory.plan_memory(sizes, memory.demand_for(go_fast_default, go_fast_input,
                                                           default_resident(go_fast_default)),
                                  gpu_total=gpu.total_bytes, **memory.budgets_from_settings(gpu.total_bytes))
        if not plan.fits or report.setup.status != "ok":
            rows.append(f"| {gpu} | {report.klass} | refused | — | — | — | — | — |")
            continue
        streams = " / ".join(
            f"{plan.streamed_bytes[v] / memory.GIB:.1f}, {plan.streamed_bytes[v] / memory.HOST_LINK:.2f}"
            if v in plan.streamed_bytes else "—" for v in ("dev-bf16", "dev-fp8"))
        peak = _peaks(report)
        resident = ", ".join(plan.variants(memory.RESIDENT)) or "none (one in the slot)"
        go_fast = kernel.name if go_fast_input else "—"
        rows.append(f"| {gpu} | {report.klass} | {resident} | {streams} | {go_fast} | {peak('txt2img dev')} | "
                    f"{peak('4 x 1440x1440')} | {peak('4 x 1 MP go_fast')} |")
    return "\n".join(rows)


def _peaks(report):
    """label -> its simulated peak in GiB as a cell ("—" where the request was not run)."""
    steps = {step.label: step for step in report.requests}

    def peak(label: str) -> str:
        step = steps.get(label)
        if step is None:
            return "—"
        return f"{step.peak / 2**30:.1f}" if step.status == "ok" else step.status

    return peak


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
