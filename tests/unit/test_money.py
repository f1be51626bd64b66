import pytest

from dpp.domain.errors import InvalidMoney
from dpp.domain.money import format_usd, parse_usd


@pytest.mark.parametrize(
    "text, micros",
    [("5.00", 5_000_000), ("0.000125", 125), ("0", 0), ("12", 12_000_000), ("0.1", 100_000), ("999999.999999", 999_999_999_999)],
)
def test_parses_plain_decimal_strings_exactly(text, micros):
    assert parse_usd(text) == micros


@pytest.mark.parametrize(
    "bad",
    ["-1.00", "1e3", "NaN", "nan", "Infinity", "1.0000001", "", " 1.00", "1.00 ", "+1", "01.5", "1.", ".5", "1,00", "0x10",
     "1.00\n", "1\n", "0.50\r\n", "\n1.00", "1.00\x00", "１.00"],  # issue 14: "$" matched before a newline
)
def test_rejects_everything_else(bad):
    with pytest.raises(InvalidMoney):
        parse_usd(bad)


@pytest.mark.parametrize("not_a_string", [1.5, 1, None, True, [], {}])
def test_rejects_json_numbers_and_other_types(not_a_string):
    with pytest.raises(InvalidMoney):
        parse_usd(not_a_string)


@pytest.mark.parametrize(
    "micros, text",
    [(5_000_000, "5.00"), (125, "0.000125"), (0, "0.00"), (100_000, "0.10"), (1_234_567, "1.234567"), (-5, "-0.000005")],
)
def test_formats_with_two_to_six_decimals(micros, text):
    assert format_usd(micros) == text


def test_round_trip_is_exact():
    for micros in (0, 1, 10, 999_999, 1_000_000, 123_456_789):
        assert parse_usd(format_usd(micros)) == micros


def test_format_refuses_floats():
    with pytest.raises(TypeError):
        format_usd(1.5)
