"""Every deployed class on every card, on the simulated GPU (tests/fixtures/simulated_gpu): setup, then the request
list of tests/fixtures/simulated_requests.py through FluxGenerator, as cog calls each class.

Both sizes run the product's own GPU memory plan for the card: with the 1/1/1 real-width model (every card) the
placement is the card's, the memory never tight; at full size (19/38/24 layers: a 16, 22.5, 24, 40, 80 and 141 GiB
card) the memory is the real one. Each check (tests/fixtures/simulated_table.py) is its own test.
"""

from __future__ import annotations

import pytest

from flux.fast.cards import CARDS, card
from flux.fast.memory import DEPLOYED
from tests.fixtures.simulated_requests import FULL_SIZE_REQUESTS, REQUESTS, prepare_workdir, simulated_server
from tests.fixtures.simulated_table import violations
from weights.synthetic.components import FULL_SIZE, Layers

SIZES = {  # name -> layers, requests, cards
    "1-1-1": (Layers(1, 1, 1), REQUESTS, tuple(item.short for item in CARDS)),
    # at full size, one card of each memory situation: streaming (16, 22.5, 24 GiB), T5 on the host (40), every
    # variant in turn (80), every one resident (141); 48 GiB runs in bench/simulated_cards --full-size
    "full": (FULL_SIZE, FULL_SIZE_REQUESTS, ("RTX 4080", "L4", "RTX 4090", "A100 40GB", "H100", "H200")),
}
REFUSED = {"T4": "GpuCannotServe: The Tesla T4 (compute capability 7.5"}  # card -> how its setup refuses every class
SERVES = {klass: tuple(item.short for item in CARDS if item.short not in REFUSED) for klass in DEPLOYED}


def cases(check: str, *, serving_only: bool = True) -> list:
    """(size, class, card) for every class and card (those that serve, for checks of requests)."""
    params = []
    for size, (_, _, cards) in SIZES.items():
        for klass in DEPLOYED:
            for name in cards:
                if serving_only and name not in SERVES[klass]:
                    continue
                params.append(pytest.param(size, klass, name, id=f"{size}-{klass}-{name.replace(' ', '')}"))
    return params


class Runs:
    """Each (size, class, card) served once per worker (tests/fixtures/scheduling.py keeps a case's checks on one);
    cards in the same situation on the same worker share their request runs."""

    def __init__(self, root):
        self.root, self.reports, self.served, self.safety = root, {}, {}, {}

    def report(self, size: str, klass: str, name: str):
        key = (size, klass, name)
        if key not in self.reports:
            layers, requests, _ = SIZES[size]
            workdir = self.root / size
            if size not in self.safety:
                self.safety[size] = prepare_workdir(workdir, layers)
            with simulated_server(klass, card(name), layers, workdir, self.safety[size]) as server:
                self.reports[key] = server.serve(requests, self.served.setdefault((size, klass), {}))
        return self.reports[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("simulated-cards"))


@pytest.mark.parametrize(("size", "klass", "name"), cases("setup", serving_only=False))
def test_setup_serves_the_class_or_refuses_with_the_reason(runs, size, klass, name):
    setup = runs.report(size, klass, name).setup
    if name in SERVES[klass]:
        assert setup.status == "ok", setup.error
        assert setup.peak <= card(name).total_bytes
    else:
        assert setup.status == "refused" and setup.error.startswith(REFUSED[name]), setup.error
        assert "cannot serve FLUX.1" in setup.error


@pytest.mark.parametrize(("size", "klass", "name"), cases("requests"))
def test_every_request_kind_is_served(runs, size, klass, name):
    report = runs.report(size, klass, name)
    failed = [f"{step.label}: {step.error[:200]}" for step in report.requests
              if step.status == "failed" and step.label != "out of memory"]
    refused = [f"{step.label}: {step.error[:200]}" for step in report.requests
               if step.status == "refused" and step.label != "out of memory"]
    assert not failed and not refused  # every request kind is served on every card that sets up
    for step in report.requests:
        if step.status == "ok":
            assert step.peak <= card(name).total_bytes


@pytest.mark.parametrize(("size", "klass", "name"), cases("out of memory"))
def test_running_out_of_memory_is_refused_with_a_clear_error(runs, size, klass, name):
    (step,) = [step for step in runs.report(size, klass, name).requests if step.label == "out of memory"]
    assert step.status == "refused", step.error[:300]


@pytest.mark.parametrize(("size", "klass", "name"), cases("next"))
def test_the_server_takes_the_request_after_running_out_of_memory(runs, size, klass, name):
    assert not violations(runs.report(size, klass, name))["next"]


@pytest.mark.parametrize(("size", "klass", "name"), cases("placement"))
def test_every_component_keeps_its_setup_dtype_and_device(runs, size, klass, name):
    assert not violations(runs.report(size, klass, name))["placement"]


@pytest.mark.parametrize(("size", "klass", "name"), cases("bytes"))
def test_the_plans_bytes_per_component_are_the_live_bytes_within_one_percent(runs, size, klass, name):
    assert not violations(runs.report(size, klass, name))["bytes"]


def test_a_go_fast_variant_built_for_a_request_says_when_it_runs_without_compiled_graphs(tmp_path, caplog):
    """Predictor compiles no fp8 variant at setup, so one built for a request runs its 8-bit kernels eagerly: slower
    than bf16 on a GPU, and the log says so (FLUX_RESIDENT_VARIANTS with an fp8 variant is the remedy)."""
    import logging

    layers = Layers(1, 1, 1)
    safety = prepare_workdir(tmp_path, layers)
    go_fast = next(spec for spec in REQUESTS if spec.label == "txt2img dev go_fast")
    with caplog.at_level(logging.WARNING, logger="flux.pipelines"), \
            simulated_server("Predictor", card("H100"), layers, tmp_path, safety) as server:
        report = server.serve((go_fast,), {})
    assert report.requests[0].status == "ok", report.requests[0].error
    assert "FLUX dev-fp8 runs without torch.compile" in caplog.text
