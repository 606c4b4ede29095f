"""Synthetic FLUX.1 weights (weights/synthetic): the real layout and configs, shards as the real repos shard,
values that are a pure function of (seed, name), finite activations, loadable by plain diffusers and by the
product, and the in-memory builder equal to the files. Most tests use the 1/1/1 real-width folder."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from weights import real_configs as real
from weights.manifest import MANIFEST
from weights.synthetic.components import Layers, component, components
from weights.synthetic.modules import build_synthetic_module
from weights.synthetic.shards import plan_shards, write_sharded
from weights.synthetic.values import STORED_DTYPE, SyntheticTensors, tensor_seed
from weights.tiny.flux import SCHEDULER_CONFIGS
from weights.tiny.safety import STAGE1_PREPROCESSOR, STAGE2_PREPROCESSOR
from weights.tiny.tokenizers import CLIP_EOS

TRUNCATED = Layers(1, 1, 1)


def _config(root: Path, folder: str) -> dict:
    return json.loads((root / folder / "config.json").read_text())


# --- layout and configs --------------------------------------------------------------------------------------

def test_every_file_is_one_the_manifest_fetches_and_every_component_is_there(real_width_weights):
    for name, source in MANIFEST.items():
        folder = real_width_weights / source.folder
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        unfetched = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in source.allow_patterns)]
        assert files and unfetched == [], name
    dev = real_width_weights / MANIFEST["dev"].folder
    index = json.loads((dev / "model_index.json").read_text())
    components_named = [key for key in index if not key.startswith("_")]
    assert sorted(p.name for p in dev.iterdir() if p.is_dir()) == sorted(components_named)
    schnell = real_width_weights / MANIFEST["schnell"].folder
    assert sorted(p.name for p in schnell.iterdir() if not p.name.startswith(".")) == ["model_index.json", "scheduler", "transformer"]


def test_configs_are_the_real_ones_except_the_layer_counts(real_width_weights):
    for model in ("dev", "schnell"):
        config = _config(real_width_weights, f"{MANIFEST[model].folder}/transformer")
        expected = {key: list(v) if isinstance(v, tuple) else v for key, v in real.TRANSFORMER.items()}
        assert {key: config[key] for key in expected} == expected | {"num_layers": 1, "num_single_layers": 1}
        assert config["guidance_embeds"] is real.GUIDANCE_EMBEDS[model]
        scheduler = json.loads((real_width_weights / MANIFEST[model].folder / "scheduler/scheduler_config.json").read_text())
        assert {key: scheduler[key] for key in SCHEDULER_CONFIGS[model]} == SCHEDULER_CONFIGS[model]
    t5 = _config(real_width_weights, "FLUX.1-dev/text_encoder_2")
    shape_keys = ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "feed_forward_proj")
    assert {k: t5[k] for k in shape_keys} == {k: real.T5_XXL[k] for k in shape_keys}
    assert (t5["num_layers"], t5["architectures"], t5["dtype"]) == (1, ["T5EncoderModel"], "bfloat16")
    clip = _config(real_width_weights, "FLUX.1-dev/text_encoder")
    assert {k: clip[k] for k in real.CLIP_TEXT} == real.CLIP_TEXT
    assert (clip["bos_token_id"], clip["eos_token_id"], clip["pad_token_id"]) == (0, 2, 1)  # openai's ids
    vae = _config(real_width_weights, "FLUX.1-dev/vae")
    assert {k: vae[k] for k in real.VAE} == {k: list(v) if isinstance(v, tuple) else v for k, v in real.VAE.items()}
    stage1 = _config(real_width_weights, MANIFEST["safety_stage1"].folder)
    assert {k: stage1["vision_config"][k] for k in real.SAFETY_STAGE1_VISION} == real.SAFETY_STAGE1_VISION
    assert stage1["projection_dim"] == real.SAFETY_STAGE1_PROJECTION
    stage2 = _config(real_width_weights, MANIFEST["safety_stage2"].folder)
    assert {k: stage2[k] for k in real.SAFETY_STAGE2 if k != "num_labels"} == {
        k: v for k, v in real.SAFETY_STAGE2.items() if k != "num_labels"}
    assert stage2["id2label"] == {"0": "normal", "1": "nsfw"}
    for stage, preprocessor in (("safety_stage1", STAGE1_PREPROCESSOR), ("safety_stage2", STAGE2_PREPROCESSOR)):
        path = real_width_weights / MANIFEST[stage].folder / "preprocessor_config.json"
        assert json.loads(path.read_text()) == preprocessor


# --- storage -------------------------------------------------------------------------------------------------

def test_full_size_shards_as_the_real_repos_shard():
    """Planned from the full-size shapes on meta: FLUX.1-dev's transformer in 3 shards, its T5 in 2."""
    for kind, count, pattern in (("transformer-dev", 3, "diffusion_pytorch_model-{:05d}-of-00003.safetensors"),
                                 ("t5", 2, "model-{:05d}-of-00002.safetensors")):
        item = component(kind)
        model = item.build_on_meta()
        params = dict(model.named_parameters())
        shapes = {stored: tuple(params[name].shape) for stored, name in item.stored_names(model).items()}
        from weights.synthetic.components import MAX_SHARD_SIZE, WEIGHTS_FILE

        split = plan_shards(shapes, STORED_DTYPE, WEIGHTS_FILE[item.library], MAX_SHARD_SIZE[item.library])
        assert split.is_sharded and list(split.filename_to_tensors) == [pattern.format(i + 1) for i in range(count)]
        assert sorted(split.tensor_to_filename) == sorted(shapes)
    t5_bytes = SyntheticTensors(component("t5"), component("t5").build_on_meta(), 0).nbytes()
    assert t5_bytes == pytest.approx(9.52e9, rel=0.001)  # the tied embedding stored once


def test_sharded_files_and_index_load_back(tmp_path):
    shapes = {"a.weight": (64, 128), "b.weight": (256, 64), "c.bias": (7,)}
    made = {name: torch.randn(shape).to(STORED_DTYPE) for name, shape in shapes.items()}
    written = write_sharded(tmp_path, shapes, STORED_DTYPE, made.__getitem__, pattern="model{suffix}.safetensors",
                            max_shard_size="20KB")
    assert written == sum(math.prod(s) * 2 for s in shapes.values())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == written
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for name, filename in index["weight_map"].items():
        with safe_open(tmp_path / filename, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert torch.equal(handle.get_tensor(name), made[name])


def test_the_folder_is_bf16_safetensors_that_safe_open_reads(real_width_weights):
    files = sorted(real_width_weights.rglob("*.safetensors"))
    assert len(files) == 7
    for path in files:
        with safe_open(path, framework="pt") as handle:
            name = next(iter(handle.keys()))
            assert handle.get_tensor(name).dtype == torch.bfloat16


# --- values --------------------------------------------------------------------------------------------------

def test_values_are_a_pure_function_of_seed_component_and_name():
    name = "transformer_blocks.0.attn.to_q.weight"
    dev, schnell = component("transformer-dev"), component("transformer-schnell")
    full = SyntheticTensors(dev, dev.build_on_meta(), seed=0)
    truncated = SyntheticTensors(dev, dev.build_on_meta(TRUNCATED), seed=0)
    again = truncated.read(name, "cpu")
    assert torch.equal(full.read(name, "cpu"), again)  # the truncated model is the full one's first blocks
    other_seed = SyntheticTensors(dev, dev.build_on_meta(TRUNCATED), seed=1).read(name, "cpu")
    other_model = SyntheticTensors(schnell, schnell.build_on_meta(TRUNCATED), seed=0).read(name, "cpu")
    assert not torch.equal(again, other_seed) and not torch.equal(again, other_model)
    assert tensor_seed(0, dev.key, name) == tensor_seed(0, dev.key, name) != tensor_seed(0, dev.key, name + "x")
    # torch's Linear init: U(±1/sqrt(fan_in)), here fan_in 3072, rounded to bf16 (8 significant bits)
    bound = 3072**-0.5
    assert again.abs().max().item() <= bound * (1 + 2**-8)
    assert again.float().std().item() == pytest.approx(bound / 3**0.5, rel=0.01)


def test_every_parameter_of_every_component_has_an_init_rule():
    for item in components():
        assert SyntheticTensors(item, item.build_on_meta(TRUNCATED), 0).nbytes() > 0, item.key


# --- loading and running -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(real_width_weights):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(real_width_weights / "FLUX.1-dev", torch_dtype=torch.bfloat16)


def test_plain_diffusers_loads_it_and_the_tiny_clip_tokenizer_pools_at_its_end_token(pipeline):
    assert pipeline.transformer.config.num_layers == 1 and pipeline.text_encoder_2.config.d_model == 4096
    tokens = pipeline.tokenizer(["a photo of TOK"], padding="max_length", max_length=77, return_tensors="pt")
    eos = pipeline.tokenizer.convert_tokens_to_ids(CLIP_EOS)
    first_eos = int((tokens.input_ids[0] == eos).nonzero()[0])
    with torch.no_grad():
        out = pipeline.text_encoder(tokens.input_ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, first_eos])


def test_one_forward_of_each_model_is_finite(pipeline):
    with torch.no_grad():
        t5 = pipeline.text_encoder_2(torch.tensor([[5, 17, 42, 1]])).last_hidden_state
        side = 8  # 8x8 packed tokens = 16x16 latents = 128x128 pixels
        axis = torch.arange(side, dtype=torch.float32)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
        out = pipeline.transformer(
            hidden_states=torch.randn(1, side * side, 64, dtype=torch.bfloat16),
            encoder_hidden_states=t5.to(torch.bfloat16), pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16),
            timestep=torch.tensor([0.5], dtype=torch.bfloat16), guidance=torch.tensor([3.5], dtype=torch.bfloat16),
            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(t5.shape[1], 3), return_dict=False,
        )[0]
        image = pipeline.vae.decode(torch.randn(1, 16, 16, 16, dtype=torch.bfloat16)).sample
    for tensor in (t5, out, image):
        assert torch.isfinite(tensor).all() and tensor.float().std() > 0
    assert image.shape == (1, 3, 128, 128)


def test_in_memory_modules_equal_the_files(pipeline, real_width_weights):
    from diffusers import FluxTransformer2DModel

    from safety.checker import SafetyChecker

    schnell = FluxTransformer2DModel.from_pretrained(real_width_weights / "FLUX.1-schnell", subfolder="transformer",
                                                     torch_dtype=torch.bfloat16)
    safety = SafetyChecker.load(real_width_weights / MANIFEST["safety_stage1"].folder,
                                real_width_weights / MANIFEST["safety_stage2"].folder, "cpu")
    loaded = {"transformer-dev": pipeline.transformer, "clip": pipeline.text_encoder, "t5": pipeline.text_encoder_2,
              "vae": pipeline.vae, "transformer-schnell": schnell,
              "safety-stage1": safety.stage1_model, "safety-stage2": safety.stage2_model}
    for kind, module in loaded.items():
        dtype = next(module.parameters()).dtype
        built = build_synthetic_module(kind, "cpu", dtype, TRUNCATED).state_dict()
        files = module.state_dict()
        assert built.keys() == files.keys(), kind
        assert all(torch.equal(built[k], files[k]) and built[k].dtype == files[k].dtype for k in files), kind


def test_the_product_finds_it_through_flux_weights_dir(real_width_weights, monkeypatch):
    from weights.locations import resolve_weight_paths

    monkeypatch.setenv("FLUX_WEIGHTS", "real")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(real_width_weights))
    paths = resolve_weight_paths(cuda_available=False)
    assert not paths.tiny and paths.dev == real_width_weights / "FLUX.1-dev"
    assert paths.safety_stage2 == real_width_weights / "nsfw_image_detection"
