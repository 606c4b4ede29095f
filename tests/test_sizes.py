import pytest

from errors import UserError
from flux.sizes import SIZES_1MP, fit_image_size, output_size, round_to_multiple

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
    "value, expected", [(256, 256), (257, 256), (263, 256), (264, 272), (1000, 1008), (1015, 1008), (1440, 1440), (1439, 1440)]
)
def test_custom_rounds_to_nearest_16(value, expected):
    assert output_size("custom", "1", value, value) == (expected, expected)


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
        ((4000, 3000), (1440, 1088)),  # 1440x1080 -> 1088 (nearest multiple of 16)
        ((3000, 4000), (1088, 1440)),
        ((500, 333), (496, 336)),
        ((1440, 100), (1440, 96)),
        ((64, 64), (64, 64)),
    ],
)
def test_input_image_is_fitted(size, expected):
    w, h = fit_image_size(*size)
    assert (w, h) == expected
    assert w % 16 == 0 and h % 16 == 0 and max(w, h) <= 1440


def test_round_to_multiple_never_zero():
    assert round_to_multiple(3) == 16
