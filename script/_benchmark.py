"""CPU benchmark on the tiny weights. Every figure is a ratio of two timings taken in this one run.

P1  predict() end to end / a bare diffusers FluxPipeline call (1024x1024, 4 steps, 1 output). Goal <= 1.10
P5  cold setup (Predictor.setup) / bare FluxPipeline.from_pretrained.                          Goal <= 1.3
P6  HTTP round trip through coglet / in-process predict().                                     Goal <= 1.10
The two sides of each ratio are interleaved and the median of the repeats is used, as this machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["FLUX_WEIGHTS"] = "tiny"

PROMPT = "a photo of TOK riding a bicycle"
REQUEST = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 1, "guidance_scale": 3.5}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def interleave(repeats: int, a, b) -> tuple[float, float]:
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a)[0])
        times_b.append(timed(b)[0])
    return statistics.median(times_a), statistics.median(times_b)


def report(goal_id: str, label: str, ours: float, base: float, goal: str) -> None:
    print(f"{goal_id}  {label:<58} {ours:7.3f}s / {base:7.3f}s = {ours / base:5.2f}  (goal {goal})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()

    import logging

    import torch
    from diffusers import FluxPipeline

    from predict import Predictor, predict_with_defaults
    from weights.config import tiny_weight_paths

    weights = tiny_weight_paths()
    logging.disable(logging.INFO)  # keep step logs out of the figures' output
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny weights in {weights.dev.parent}")

    # warm the file cache and imports for both sides before timing setup
    FluxPipeline.from_pretrained(weights.dev, torch_dtype=torch.float32)
    predictor = Predictor()
    predictor.setup()
    predictor.generator.pipelines.wait_for_background_loads()
    logging.disable(logging.INFO)

    def bare_load():
        return FluxPipeline.from_pretrained(weights.dev, torch_dtype=torch.float32)

    setup_ours_times, setup_bare_times = [], []
    for _ in range(max(3, args.repeats)):
        fresh = Predictor()
        setup_ours_times.append(timed(fresh.setup)[0])  # ready to serve dev; schnell goes on loading
        logging.disable(logging.INFO)
        fresh.generator.pipelines.wait_for_background_loads()  # loads must not overlap (see MODEL_LOADING)
        setup_bare_times.append(timed(bare_load)[0])
    setup_ours, setup_bare = statistics.median(setup_ours_times), statistics.median(setup_bare_times)

    bare = bare_load()
    bare.set_progress_bar_config(disable=True)

    def bare_call():
        generator = [torch.Generator("cpu").manual_seed(1)]
        return bare(
            prompt=PROMPT, width=1024, height=1024, num_inference_steps=4, guidance_scale=3.5,
            generator=generator, max_sequence_length=512,
        ).images

    def our_predict():
        return predict_with_defaults(predictor, **REQUEST)

    bare_call(), our_predict()  # warm-up
    predict_ours, predict_bare = interleave(args.repeats, our_predict, bare_call)

    print()
    report("P1", "predict() end to end / bare FluxPipeline call", predict_ours, predict_bare, "<= 1.10")
    report("P5", "Predictor.setup() / bare FluxPipeline.from_pretrained", setup_ours, setup_bare, "<= 1.3")

    if not args.skip_http:
        from tests.fixtures.cog_server import start_cog_server, stop_cog_server

        with tempfile.TemporaryDirectory() as tmp:
            server = start_cog_server(Path(tmp))
            try:
                def http_call():
                    body = server.predict(input=REQUEST).json()
                    assert body["status"] == "succeeded", body
                http_call()
                http_time, local_time = interleave(args.repeats, http_call, our_predict)
            finally:
                stop_cog_server(server)
        report("P6", "HTTP round trip through coglet / in-process predict()", http_time, local_time, "<= 1.10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
