import logging

import pytest
from PIL import Image

from errors import UserError
from flux.images import MAX_INPUT_PIXELS
from flux.request import LIMITS, build_request
from flux.seeds import batch_seeds, resolve_seed


def png(tmp_path, size=(300, 200), name="in.png", mode="RGB", color=(200, 10, 10)):
    path = tmp_path / name
    Image.new(mode, size, color if mode == "RGB" else 255).save(path)
    return path


def test_txt2img_defaults():
    request = build_request(prompt="a photo of TOK", seed=5)
    assert request.mode == "txt2img"
    assert (request.width, request.height) == (1024, 1024)
    assert request.seeds == [5]
    assert request.num_inference_steps == 28 and request.guidance_scale == 3.0
    assert request.loras == ()


def test_img2img_and_inpaint_modes(tmp_path):
    image = png(tmp_path, (1000, 700))
    request = build_request(prompt="x", image=image, aspect_ratio="16:9", width=512, height=512)
    assert request.mode == "img2img"
    assert (request.width, request.height) == (1008, 704)  # the image's size wins over aspect_ratio
    mask = png(tmp_path, (50 * 4, 35 * 4), name="mask.png", mode="L")
    request = build_request(prompt="x", image=image, mask=mask)
    assert request.mode == "inpaint"
    assert request.mask.size == request.image.size and request.mask.mode == "L"


def test_mask_without_image_is_refused(tmp_path):
    with pytest.raises(UserError, match="^mask: a mask needs an input image"):
        build_request(prompt="x", mask=png(tmp_path))


def test_custom_without_size():
    with pytest.raises(UserError, match="aspect_ratio: 'custom' needs height"):
        build_request(prompt="x", aspect_ratio="custom", width=512)


def test_custom_size_rounds_up_as_the_hosted_model():
    request = build_request(prompt="x", aspect_ratio="custom", width=1010, height=257)
    assert (request.width, request.height) == (1024, 272)


def test_image_too_elongated_for_64_px_is_refused(tmp_path):
    with pytest.raises(UserError, match="^image: 4000x64 is too elongated"):
        build_request(prompt="x", image=png(tmp_path, (4000, 64)))


def test_size_with_non_custom_ratio_is_ignored_with_a_log(caplog):
    with caplog.at_level(logging.INFO):
        request = build_request(prompt="x", aspect_ratio="16:9", width=300, height=300)
    assert (request.width, request.height) == (1344, 768)
    assert "only used with aspect_ratio=custom" in caplog.text


def test_unreadable_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(UserError, match="^image: the file is not an image"):
        build_request(prompt="x", image=bad)


def test_truncated_image(tmp_path):
    good = png(tmp_path, (400, 400), name="full.jpg")
    Image.open(good).save(good, "JPEG")
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="^image: "):
        build_request(prompt="x", image=cut)


def test_one_pixel_image(tmp_path):
    with pytest.raises(UserError, match="^image: 1x1 is too small"):
        build_request(prompt="x", image=png(tmp_path, (1, 1)))


def test_image_over_pixel_cap_is_refused_before_decoding(tmp_path):
    side = int(MAX_INPUT_PIXELS**0.5) + 200
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # 1-bit keeps the file small; the header still says huge
    with pytest.raises(UserError, match="^image: .* MP; the limit is 50 MP"):
        build_request(prompt="x", image=path)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(UserError, match="^prompt: is empty"):
        build_request(prompt=prompt)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_numbers_out_of_range_name_the_input(name):
    low, high = LIMITS[name]
    inputs = {name: high + 1}
    if name == "lora_scale":
        inputs["replicate_weights"] = "owner/model"
    if name == "extra_lora_scale":
        inputs["extra_lora"] = "owner/model"
    named = name
    if name == "extra_lora_scales":  # a list input (MultiLoraPredictor): each entry is named by its index
        inputs = {"extra_loras": ["owner/model"], name: [high + 1]}
        named = rf"{name}\[0\]"
    with pytest.raises(UserError, match=f"^{named}: .* out of range"):
        build_request(prompt="x", **inputs)


def test_int_given_for_float_is_accepted_and_cast():
    request = build_request(prompt="x", guidance_scale=4, prompt_strength=1)
    assert isinstance(request.guidance_scale, float) and request.guidance_scale == 4.0


@pytest.mark.parametrize("name, value", [("num_outputs", 1.5), ("num_outputs", "2"), ("guidance_scale", "3"), ("seed", "7")])
def test_wrong_types(name, value):
    with pytest.raises(UserError, match=f"^{name}: expected"):
        build_request(prompt="x", **{name: value})


@pytest.mark.parametrize("name, value", [("model", "pro"), ("output_format", "gif"), ("aspect_ratio", "2:1"), ("megapixels", "4")])
def test_bad_choices(name, value):
    with pytest.raises(UserError, match=f"^{name}: "):
        build_request(prompt="x", **{name: value})


def test_loras_are_collected_with_their_scales():
    request = build_request(prompt="x", replicate_weights=" owner/a ", lora_scale=0.5, extra_lora="owner/b", extra_lora_scale=2)
    assert [(s.source, s.scale, s.input_name) for s in request.loras] == [
        ("owner/a", 0.5, "replicate_weights"),
        ("owner/b", 2.0, "extra_lora"),
    ]
    assert build_request(prompt="x", extra_lora="  ").loras == ()


def test_seeds():
    assert resolve_seed(42) == 42
    randoms = {resolve_seed(None) for _ in range(20)} | {resolve_seed(-1) for _ in range(20)}
    assert len(randoms) > 30 and all(0 <= s < 2**32 for s in randoms)
    assert batch_seeds(10, 3) == [10, 11, 12]
    assert build_request(prompt="x", seed=7, num_outputs=3).seeds == [7, 8, 9]


def test_huge_seed_is_refused_and_negative_means_random():
    with pytest.raises(UserError, match="^seed: .* too large"):
        build_request(prompt="x", seed=2**64)
    assert 0 <= build_request(prompt="x", seed=-5).seed < 2**32
