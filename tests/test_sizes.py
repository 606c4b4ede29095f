import pytest

from errors import UserError
from flux.sizes import SIZES_1MP, fit_image_size, output_size, round_up_to_multiple

TABLE_1MP = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}


@pytest.mark.parametrize("ratio", sorted(TABLE_1MP))
def test_every_ratio_at_both_megapixels(ratio):
    w, h = TABLE_1MP[ratio]
    assert output_size(ratio, "1") == (w, h)
    assert output_size(ratio, "0.25") == (w // 2, h // 2)
    assert (w // 2) % 16 == 0 and (h // 2) % 16 == 0


def test_table_is_exactly_the_design_table():
    assert SIZES_1MP == TABLE_1MP


@pytest.mark.parametrize(
    "value, expected",
    [(256, 256), (257, 272), (271, 272), (272, 272), (1000, 1008), (1010, 1024), (1015, 1024), (1439, 1440), (1440, 1440)],
)
def test_custom_rounds_up_to_a_multiple_of_16_as_the_hosted_model(value, expected):
    """The hosted model's make_multiple_of_16 is ((n + 15) // 16) * 16; the seed text's 'nearest' is not what it does."""
    assert output_size("custom", "1", value, value) == (expected, expected)
    assert output_size("custom", "1", value, 512) == (expected, 512)


def test_custom_ignores_megapixels():
    assert output_size("custom", "0.25", 512, 768) == (512, 768)


@pytest.mark.parametrize("w, h", [(255, 512), (512, 1441), (0, 512), (-16, 512)])
def test_custom_out_of_bounds_names_the_input(w, h):
    with pytest.raises(UserError, match="width|height"):
        output_size("custom", "1", w, h)


@pytest.mark.parametrize("w, h, missing", [(None, 512, "width"), (512, None, "height"), (None, None, "width and height")])
def test_custom_without_size_is_a_clear_error(w, h, missing):
    with pytest.raises(UserError, match=f"aspect_ratio: 'custom' needs {missing}"):
        output_size("custom", "1", w, h)


def test_unknown_ratio_and_megapixels():
    with pytest.raises(UserError, match="aspect_ratio"):
        output_size("7:5")
    with pytest.raises(UserError, match="megapixels"):
        output_size("1:1", "2")


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1024, 1024), (1024, 1024)),
        ((4000, 3000), (1440, 1088)),  # 1440x1080, 1080 rounded up
        ((3000, 4000), (1088, 1440)),
        ((500, 333), (512, 336)),  # never scaled up; each side rounded up
        ((1440, 100), (1440, 112)),
        ((1439, 1439), (1440, 1440)),  # rounding up stops at 1440, itself a multiple of 16
        ((2000, 1999), (1440, 1440)),  # 1439.28 truncated to 1439, then up to 1440
        ((64, 64), (64, 64)),
        ((2880, 98), (1440, 64)),  # 49 px fitted: the most elongated input that is accepted
    ],
)
def test_input_image_is_fitted_as_the_hosted_model(size, expected):
    assert fit_image_size(*size) == expected


def test_fitted_sizes_stay_inside_1440_in_multiples_of_16_and_keep_the_orientation():
    for width in range(64, 6000, 7):
        for height in (64, 300, 1439, 2000, 5000):
            try:
                w, h = fit_image_size(width, height)
            except UserError:
                assert max(width, height) / min(width, height) > 29, (width, height)
                continue
            assert w % 16 == 0 and h % 16 == 0, (width, height)
            assert 64 <= min(w, h) and max(w, h) <= 1440, (width, height)
            assert w < width + 16 and h < height + 16, (width, height)  # never scaled up
            assert (w >= h) if width >= height else (w <= h), (width, height)


@pytest.mark.parametrize("size, fitted", [((4000, 64), "1440x32"), ((64, 4000), "32x1440"), ((2880, 97), "1440x48")])
def test_inputs_too_elongated_to_keep_64_px_are_refused(size, fitted):
    """The hosted model would answer 4000x64 with a 1440x32 image; we refuse it and say why."""
    with pytest.raises(UserError, match=f"^image: {size[0]}x{size[1]} is too elongated; .* would be {fitted}, .* at least 64"):
        fit_image_size(*size)


def test_round_up_to_multiple():
    assert [round_up_to_multiple(n) for n in (0, 1, 16, 17, 1010)] == [0, 16, 16, 32, 1024]
