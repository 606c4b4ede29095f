"""`bench/soak [-n 300]`: many predictions through the real coglet server, as a long-running container sees them.

Each prediction is 0.25 MP and one step, and they cycle through: no LoRA, LoRA A, LoRA B, both, img2img and
inpaint, with num_outputs 1 to 4 and every output format. LoRAs come from a local HTTP server (so the download
cache is used), images as data URIs. Prints the worker's RSS as it goes, whether a reference request made first
and again at the end gives byte-identical files, and every error. Exits 1 if any prediction failed or the
reference changed.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tests.fixtures.cog_server import start_cog_server, stop_cog_server  # noqa: E402
from tests.fixtures.servers import FileServer  # noqa: E402

VARIANTS = ["no LoRA", "LoRA A", "LoRA B", "both LoRAs", "img2img", "inpaint"]
FORMATS = ["webp", "jpg", "png"]


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_inputs(work: Path) -> dict[str, str]:
    """Two LoRAs (served locally) and an image and a mask (as data URIs)."""
    from weights.libraries import prepare_libraries

    prepare_libraries()  # this process builds the LoRAs with diffusers: no import noise in the report
    from tests.fixtures.lora_factory import make_spec, write_layout
    from weights.tiny.flux import tiny_transformer

    transformer = tiny_transformer(guidance_embeds=True)
    host = FileServer()
    loras = {}
    for name, layout, seed in (("a", "kohya", 1), ("b", "diffusers", 2)):
        path = write_layout(layout, make_spec(transformer, seed=seed, magnitude=0.3), transformer, work / f"{name}.safetensors")
        loras[name] = host.add(f"/{name}.safetensors", path.read_bytes())
    photo = Image.effect_noise((512, 512), 50).convert("RGB")
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (128, 128, 384, 384))
    return {"lora_a": loras["a"], "lora_b": loras["b"], "image": data_uri(photo), "mask": data_uri(mask), "host": host}


def request_for(index: int, inputs: dict) -> tuple[str, dict]:
    variant = VARIANTS[index % len(VARIANTS)]
    request = {
        "prompt": f"soak {index}",
        "num_inference_steps": 1,
        "megapixels": "0.25",
        "num_outputs": 1 + index % 4,
        "output_format": FORMATS[index % len(FORMATS)],
        "seed": index,
    }
    if variant in ("LoRA A", "both LoRAs"):
        request["replicate_weights"] = inputs["lora_a"]
    if variant in ("LoRA B", "both LoRAs"):
        request["extra_lora"] = inputs["lora_b"]
    if variant in ("img2img", "inpaint"):
        request["image"] = inputs["image"]
    if variant == "inpaint":
        request["mask"] = inputs["mask"]
    return variant, request


def worker_rss_mb(server_pid: int) -> float:
    """Resident memory of coglet's Python worker (the server's child process), in MiB."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != server_pid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="number of predictions (default 300)")
    parser.add_argument("--every", type=int, default=0, help="print RSS every this many (default: n/10)")
    args = parser.parse_args()
    every = args.every or max(1, args.n // 10)

    os.environ.setdefault("FLUX_TINY_WEIGHTS_DIR", str(ROOT / ".cache" / "tiny-weights"))
    os.environ["FLUX_WEIGHTS"] = "tiny"
    work = Path(tempfile.mkdtemp(prefix="flux-soak-"))
    inputs = make_inputs(work)
    env = {"FLUX_ALLOW_PRIVATE_URLS": "1", "FLUX_LORA_CACHE_DIR": str(work / "lora-cache"), "FLUX_INPUT_LOCAL_DIRS": ""}
    started = time.monotonic()
    server = start_cog_server(work, env)
    pid = server.process.pid
    print(f"coglet ready in {time.monotonic() - started:.1f}s; {args.n} predictions follow", flush=True)
    errors: list[str] = []
    identical = False
    try:
        reference = {**request_for(3, inputs)[1], "output_format": "png", "seed": 1234}  # both LoRAs, 4 images
        first = server.predict(input=reference, timeout=300).json()
        if first["status"] != "succeeded":
            errors.append(f"reference: {first.get('error')}")
        print(f"{'done':>6} {'seconds':>8} {'worker RSS MiB':>15}", flush=True)
        print(f"{0:>6} {time.monotonic() - started:>8.1f} {worker_rss_mb(pid):>15.0f}", flush=True)
        counts: dict[str, int] = {}
        for index in range(args.n):
            variant, request = request_for(index, inputs)
            body = server.predict(input=request, timeout=300).json()
            counts[variant] = counts.get(variant, 0) + 1
            if body.get("status") != "succeeded" or len(body.get("output") or []) != request["num_outputs"]:
                errors.append(f"#{index} ({variant}): {body.get('status')} {body.get('error')}")
            if (index + 1) % every == 0:
                print(f"{index + 1:>6} {time.monotonic() - started:>8.1f} {worker_rss_mb(pid):>15.0f}", flush=True)
        last = server.predict(input=reference, timeout=300).json()
        identical = last.get("output") == first.get("output")
        print("by variant:", ", ".join(f"{name} {count}" for name, count in counts.items()))
        print(f"reference request repeated at the end: {'byte-identical' if identical else 'DIFFERENT'}")
    finally:
        stop_cog_server(server)
        inputs["host"].close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"errors: {len(errors)}")
    for error in errors:
        print("  " + error)
    return 0 if not errors and identical else 1


if __name__ == "__main__":
    sys.exit(main())
