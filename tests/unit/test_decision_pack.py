"""The decision pack, with no services: what a caller sees in output, errors and price."""
from __future__ import annotations

import json

import pytest

from dpp.domain.errors import InvalidPackInputs
from dpp.domain.packs.decision import PRECISION, PRICE, DecisionPack

PACK = DecisionPack()


def run(inputs):
    fractions = []
    result = PACK.run(inputs, fractions.append)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    return result


def errors_of(inputs) -> dict[str, list[str]]:
    with pytest.raises(InvalidPackInputs) as caught:
        PACK.validate(inputs)
    return caught.value.errors


def cars(price_direction="min", weights=(2, 1), **extra):
    return {
        "question": "Which car?",
        "options": ["A", "B", "C"],
        "criteria": [
            {"name": "price", "weight": weights[0], "direction": price_direction},
            {"name": "comfort", "weight": weights[1]},
        ],
        "scores": {
            "A": {"price": 10, "comfort": 1},
            "B": {"price": 20, "comfort": 5},
            "C": {"price": 30, "comfort": 9},
        },
        **extra,
    }


def winner(inputs) -> str | None:
    return run(inputs).output.get("recommendation")


# --- validation ---


@pytest.mark.parametrize("inputs", [None, [], "question", 3, True])
def test_non_object_inputs_are_rejected_on_inputs(inputs):
    assert errors_of(inputs) == {"inputs": ["must be an object"]}


def test_every_error_is_reported_with_its_field_path():
    errors = errors_of({
        "colour": "red",
        "options": ["A", "A", " ", 7],
        "criteria": [
            {"name": "cost", "weight": 0, "direction": "min"},
            {"name": "speed", "weight": True, "direction": "up"},
            {"name": "cost", "weight": 1, "shade": "x"},
            {"weight": "heavy"},
            "fast",
        ],
        "scores": {"Z": {}, "B": 3},
        "method": "ahp",
        "mode": "slow",
    })
    assert set(errors) == {
        "inputs.colour", "inputs.question", "inputs.options[1]", "inputs.options[2]",
        "inputs.options[3]", "inputs.criteria[0].weight", "inputs.criteria[1].weight",
        "inputs.criteria[1].direction", "inputs.criteria[2].name",
        "inputs.criteria[2].shade", "inputs.criteria[3].name", "inputs.criteria[3].weight",
        "inputs.criteria[4]", "inputs.scores.B", "inputs.method", "inputs.mode",
    }
    assert errors["inputs.question"] == ["required"]
    assert errors["inputs.options[1]"] == ["duplicate of inputs.options[0]"]
    assert errors["inputs.criteria[2].name"] == ["duplicate of inputs.criteria[0].name"]
    # The options list was broken, so unknown score keys are not second-guessed.
    assert "inputs.scores.Z" not in errors


def test_score_cells_are_checked_against_options_and_criteria():
    inputs = cars()
    inputs["scores"] = {
        "A": {"price": float("nan"), "comfort": False, "speed": 1},
        "B": {"price": float("inf"), "comfort": 1e16},
        "Z": {"price": 1},
    }
    errors = errors_of(inputs)
    assert set(errors) == {"inputs.scores.A.price", "inputs.scores.A.comfort",
                           "inputs.scores.A.speed", "inputs.scores.B.price",
                           "inputs.scores.B.comfort", "inputs.scores.Z"}
    assert errors["inputs.scores.Z"] == ["not one of inputs.options"]


def test_scores_naming_options_or_criteria_that_were_never_given_are_rejected():
    errors = errors_of({"question": "q", "options": ["A", "B"], "scores": {"A": {"x": 1}}})
    assert set(errors) == {"inputs.scores.A.x"}


@pytest.mark.parametrize("field, value, path", [
    ("question", "", "inputs.question"),
    ("question", "   ", "inputs.question"),
    ("question", "x" * 2001, "inputs.question"),
    ("question", 42, "inputs.question"),
    ("options", "A,B", "inputs.options"),
    ("options", ["A"], "inputs.options"),
    ("options", [f"o{i}" for i in range(51)], "inputs.options"),
    ("options", ["A", "x" * 201], "inputs.options[1]"),
    ("criteria", [], "inputs.criteria"),
    ("criteria", [{"name": f"c{i}", "weight": 1} for i in range(21)], "inputs.criteria"),
    ("criteria", [{"name": "c", "weight": -1}], "inputs.criteria[0].weight"),
    ("criteria", [{"name": "c", "weight": float("nan")}], "inputs.criteria[0].weight"),
    ("criteria", [{"name": "c", "weight": 10**400}], "inputs.criteria[0].weight"),
    ("criteria", [{"name": "c", "weight": "1"}], "inputs.criteria[0].weight"),
    ("criteria", [{"name": "c"}], "inputs.criteria[0].weight"),
    ("criteria", [{"name": "", "weight": 1}], "inputs.criteria[0].name"),
    ("scores", [1, 2], "inputs.scores"),
    ("method", None, "inputs.method"),
    ("mode", ["quick"], "inputs.mode"),
])
def test_one_bad_field_gives_one_error_path(field, value, path):
    assert set(errors_of({"question": "q", field: value})) == {path}


def test_validate_fills_defaults_and_is_idempotent():
    inputs = {"question": "q", "criteria": [{"name": "c", "weight": 0.5}]}
    validated = PACK.validate(inputs)
    assert validated == {"question": "q", "criteria": [{"name": "c", "weight": 0.5,
                         "direction": "max"}], "method": "weighted_sum", "mode": "quick"}
    assert PACK.validate(validated) == validated


# --- verdicts and ranking ---


def test_a_question_alone_completes_with_insufficient_evidence():
    result = run({"question": "Should we launch on Monday?"})
    assert result.output["verdict"] == "insufficient_evidence"
    assert result.output["needed"] == ["options", "criteria", "scores"]
    assert result.output["ranking"] == []
    assert "recommendation" not in result.output
    assert result.actual_cost_micros == 5_000


@pytest.mark.parametrize("extra, needed", [
    ({"options": ["A", "B"]}, ["criteria", "scores"]),
    ({"criteria": [{"name": "c", "weight": 1}]}, ["options", "scores"]),
    ({"options": ["A", "B"], "criteria": [{"name": "c", "weight": 1}]}, ["scores"]),
    ({"options": ["A", "B"], "criteria": [{"name": "c", "weight": 1}],
      "scores": {"A": {}}}, ["scores"]),
])
def test_partial_information_says_what_is_needed(extra, needed):
    output = run({"question": "q", **extra}).output
    assert (output["verdict"], output["needed"]) == ("insufficient_evidence", needed)


def test_weighted_sum_lower_price_wins_when_direction_is_min():
    output = run(cars("min")).output
    # price normalised A=1, B=.5, C=0; comfort A=0, B=.5, C=1; weights 2/3, 1/3.
    assert output["verdict"] == "recommendation" and output["recommendation"] == "A"
    assert output["ranking"] == [
        {"option": "A", "score": 0.666667, "rank": 1},
        {"option": "B", "score": 0.5, "rank": 2},
        {"option": "C", "score": 0.333333, "rank": 3},
    ]
    assert output["method"] == "weighted_sum"
    assert output["analysis"]["weights"] == {"price": 0.666667, "comfort": 0.333333}


def test_weighted_sum_higher_price_wins_when_direction_is_max():
    output = run(cars("max")).output
    assert output["recommendation"] == "C"
    assert [r["score"] for r in output["ranking"]] == [1.0, 0.5, 0.0]


def test_only_weight_ratios_matter():
    outputs = [run(cars(weights=w)).output for w in ((2, 1), (20, 10), (0.5, 0.25))]
    assert outputs[0] == outputs[1] == outputs[2]


def test_equal_scores_share_a_rank_and_a_tie_for_first_names_both():
    inputs = {
        "question": "q",
        "options": ["Beta", "Alpha", "Gamma"],
        "criteria": [{"name": "x", "weight": 1}, {"name": "y", "weight": 1}],
        "scores": {"Beta": {"x": 1, "y": 0}, "Alpha": {"x": 0, "y": 1},
                   "Gamma": {"x": 0, "y": 0}},
    }
    output = run(inputs).output
    assert output["verdict"] == "tie" and output["tied"] == ["Alpha", "Beta"]
    assert "recommendation" not in output
    assert [(r["option"], r["rank"]) for r in output["ranking"]] == [
        ("Alpha", 1), ("Beta", 1), ("Gamma", 3)]


def test_missing_scores_take_the_worst_observed_value_and_are_listed():
    inputs = {
        "question": "q",
        "options": ["A", "B", "C", "D"],
        "criteria": [{"name": "speed", "weight": 1}, {"name": "cost", "weight": 1,
                                                      "direction": "min"}],
        "scores": {"A": {"speed": 5, "cost": 1}, "B": {"speed": 3, "cost": 4},
                   "C": {"cost": 2}},
    }
    output = run(inputs).output
    assert output["analysis"]["missing_scores"] == [
        {"option": "C", "criterion": "speed"},
        {"option": "D", "criterion": "speed"},
        {"option": "D", "criterion": "cost"},
    ]
    scores = {r["option"]: r["score"] for r in output["ranking"]}
    # speed: A=1, others as slow as B (0); cost (min): A=1, C=2/3, B and D as dear as B (0).
    assert scores == {"A": 1.0, "C": 0.333333, "B": 0.0, "D": 0.0}
    assert output["recommendation"] == "A"


def test_a_column_that_cannot_separate_options_gives_everyone_one_half():
    inputs = {"question": "q", "options": ["A", "B"], "criteria": [{"name": "c", "weight": 1}],
              "scores": {"A": {"c": 7}, "B": {"c": 7}}}
    output = run(inputs).output
    assert output["verdict"] == "tie"
    assert [r["score"] for r in output["ranking"]] == [0.5, 0.5]


def test_topsis_reproduces_the_hwang_yoon_fighter_aircraft_example():
    # Hwang & Yoon (1981), Multiple Attribute Decision Making, fighter aircraft selection:
    # qualitative ratings on their 1-9 scale; purchasing cost is the one cost criterion.
    # Expected closeness computed independently (and matches the book: .643 .268 .614 .312).
    names = ["speed", "range", "payload", "cost", "reliability", "maneuverability"]
    weights = [0.2, 0.1, 0.1, 0.1, 0.2, 0.3]
    rows = {"A1": [2.0, 1500, 20000, 5.5, 5, 9], "A2": [2.5, 2700, 18000, 6.5, 3, 5],
            "A3": [1.8, 2000, 21000, 4.5, 7, 7], "A4": [2.2, 1800, 20000, 5.0, 5, 5]}
    inputs = {
        "question": "Which fighter aircraft?",
        "options": list(rows),
        "criteria": [{"name": n, "weight": w, "direction": "min" if n == "cost" else "max"}
                     for n, w in zip(names, weights)],
        "scores": {o: dict(zip(names, values)) for o, values in rows.items()},
        "method": "topsis",
    }
    output = run(inputs).output
    closeness = {r["option"]: r["score"] for r in output["ranking"]}
    expected = {"A1": 0.643277, "A2": 0.268384, "A3": 0.613542, "A4": 0.312291}
    assert closeness == pytest.approx(expected, abs=1e-5)
    assert [r["option"] for r in output["ranking"]] == ["A1", "A3", "A4", "A2"]
    assert output["recommendation"] == "A1" and output["method"] == "topsis"


def test_topsis_with_identical_options_is_a_tie_at_one_half():
    inputs = {"question": "q", "options": ["A", "B"], "method": "topsis",
              "criteria": [{"name": "c", "weight": 1}], "scores": {"A": {"c": 2}, "B": {"c": 2}}}
    output = run(inputs).output
    assert output["verdict"] == "tie" and [r["score"] for r in output["ranking"]] == [0.5, 0.5]


# --- sensitivity ---


def shifted(inputs, name, weight):
    """The same inputs with criterion `name` at normalised `weight`, others rescaled."""
    criteria = inputs["criteria"]
    total = sum(c["weight"] for c in criteria)
    current = next(c["weight"] for c in criteria if c["name"] == name) / total
    scale = (1 - weight) / (1 - current)
    return {**inputs, "mode": "quick", "criteria": [
        {**c, "weight": weight if c["name"] == name else c["weight"] / total * scale}
        for c in criteria]}


def test_sensitivity_edge_matches_the_analytic_crossing():
    # X wins on a, Y on b: X leads exactly while weight(a) > 0.5.
    inputs = {"question": "q", "options": ["X", "Y"], "mode": "detailed",
              "criteria": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}],
              "scores": {"X": {"a": 1, "b": 0}, "Y": {"a": 0, "b": 1}}}
    sensitivity = run(inputs).output["analysis"]["sensitivity"]
    assert sensitivity["a"]["weight"] == 0.75 and sensitivity["a"]["high"] == 1.0
    assert 0.5 < sensitivity["a"]["low"] <= 0.5 + PRECISION
    assert 0.5 - PRECISION <= sensitivity["b"]["high"] < 0.5
    assert sensitivity["b"]["low"] == 0.0


@pytest.mark.parametrize("method", ["weighted_sum", "topsis"])
def test_sensitivity_intervals_hold_the_winner_and_it_changes_just_outside(method):
    inputs = {
        "question": "Which laptop?", "method": method, "mode": "detailed",
        "options": ["Air", "Pro", "Tank", "Budget"],
        "criteria": [{"name": "price", "weight": 3, "direction": "min"},
                     {"name": "speed", "weight": 2}, {"name": "battery", "weight": 2},
                     {"name": "weight", "weight": 1, "direction": "min"}],
        "scores": {"Air": {"price": 1200, "speed": 6, "battery": 15, "weight": 1.2},
                   "Pro": {"price": 2400, "speed": 9, "battery": 12, "weight": 1.6},
                   "Tank": {"price": 1500, "speed": 8, "battery": 6, "weight": 3.0},
                   "Budget": {"price": 600, "speed": 3, "battery": 8, "weight": 2.0}},
    }
    output = run(inputs).output
    champion = output["recommendation"]
    sensitivity = output["analysis"]["sensitivity"]
    assert set(sensitivity) == {"price", "speed", "battery", "weight"}
    moved = 0
    for name, interval in sensitivity.items():
        assert interval["low"] <= interval["weight"] <= interval["high"]
        # A weight of exactly 0 or 1 is not valid input, so probe just inside those ends.
        for edge in (max(interval["low"], 1e-6), min(interval["high"], 1 - 1e-6)):
            assert winner(shifted(inputs, name, edge)) == champion
        if interval["high"] < 1:
            moved += 1
            assert winner(shifted(inputs, name, interval["high"] + 2 * PRECISION)) != champion
        if interval["low"] > 0:
            moved += 1
            assert winner(shifted(inputs, name, interval["low"] - 2 * PRECISION)) != champion
    assert moved >= 2  # the example is chosen so that some weights can flip the winner


def test_quick_mode_has_no_sensitivity_and_a_single_criterion_cannot_move():
    assert "sensitivity" not in run(cars()).output["analysis"]
    inputs = {"question": "q", "options": ["A", "B"], "mode": "detailed",
              "criteria": [{"name": "c", "weight": 4}], "scores": {"A": {"c": 1}}}
    assert run(inputs).output["analysis"]["sensitivity"] == {
        "c": {"weight": 1.0, "low": 1.0, "high": 1.0}}


# --- price and determinism ---


def test_price_is_base_plus_cells_doubled_in_detailed_mode():
    assert PRICE == {"base_micros": 5_000, "per_cell_micros": 200, "detailed_multiplier": 2}
    assert all(type(v) is int for v in PRICE.values())
    quick, detailed = cars(), cars(mode="detailed")
    assert PACK.min_price_micros(PACK.validate(quick)) == 5_000 + 200 * 3 * 2 == 6_200
    assert PACK.min_price_micros(PACK.validate(detailed)) == 12_400
    assert run(quick).actual_cost_micros == 6_200
    assert run(detailed).actual_cost_micros == 12_400
    # Options without criteria have no cells: base price only.
    assert PACK.min_price_micros({"question": "q", "options": ["A", "B"]}) == 5_000


def test_same_inputs_give_identical_output_and_cost():
    inputs = cars(mode="detailed", method="topsis")
    first, second = run(inputs), run(json.loads(json.dumps(inputs)))
    assert json.dumps(first.output, sort_keys=True) == json.dumps(second.output, sort_keys=True)
    assert first.actual_cost_micros == second.actual_cost_micros
    assert DecisionPack.pack_type == "decision" and DecisionPack.version == "1.0.0"
