"""script/simulated_cards: the card table from the simulated GPU (tests/fixtures/simulated_gpu).

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
    parser = argparse.ArgumentParser(prog="script/simulated_cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="19/38/24 layers instead of 1/1/1")
    parser.add_argument("--cards", help="comma-separated short names (default: every card)")
    parser.add_argument("--classes", default="Predictor,FastPredictor,LegacyPredictor")
    parser.add_argument("--details", action="store_true", help="list every problem found")
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
    if args.details:
        for report in reports:
            for check, items in violations(report).items():
                for item in items:
                    print(f"- {report.klass} on {report.card.short}, {check}: {item}")
    print(f"\n{len(reports)} class x card runs in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
