"""The `decision` pack: multi-criteria decision analysis as plain arithmetic.

Why pure and deterministic: the result is signed as a decision proof, and a proof is only
worth signing if anyone can recompute it from the inputs — so no clock, no randomness, no
I/O, and a price known before the run starts.

Documented behaviour (the tests hold it to this):
- Weights are normalised to sum 1; only their ratios matter.
- A missing cell takes the worst observed raw value of its column (lowest for "max",
  highest for "min"), so a gap never helps an option; a column nobody scored is constant.
  The gaps are listed in `analysis.missing_scores`.
- weighted_sum: each column is min-max normalised to 0..1 across options, inverted for
  "min". A constant column gives everyone 0.5: it cannot separate options, and the
  midpoint keeps totals on the same 0..1 scale as columns that do.
- topsis: vector normalisation, ideal and anti-ideal per column, closeness
  S- / (S+ + S-); 0.5 when every option is identical (both distances are 0).
- Scores are rounded to 6 decimals *before* ranking, so options that print the same score
  share a rank (competition ranking 1, 1, 3); order is score desc, then option name asc.
- mode "detailed" adds `analysis.sensitivity`: per criterion, the interval [low, high] of
  its weight (the others rescaled proportionally so the sum stays 1) over which the set of
  first-ranked options does not change. It walks outward from the current weight in steps
  of SCAN_STEP and bisects the first change down to PRECISION; the true edge lies within
  PRECISION beyond the reported one. A change that reverts within one step is not seen
  (impossible for weighted_sum, whose scores are linear in the weight).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from dpp.domain.errors import InvalidPackInputs
from dpp.domain.packs.base import PackResult, Progress

PRICE: dict[str, int] = {"base_micros": 5_000, "per_cell_micros": 200, "detailed_multiplier": 2}
"""Public price in USD micros: (base + per_cell × options × criteria) × multiplier,
where the multiplier applies to mode "detailed" only. A cell is one option × criterion."""

MAX_QUESTION_CHARS = 2000
MAX_NAME_CHARS = 200
# Scores beyond this would overflow TOPSIS's squares or min-max spans to inf.
MAX_ABS_SCORE = 1e15
OPTIONS_RANGE = (2, 50)
CRITERIA_RANGE = (1, 20)
METHODS = ("weighted_sum", "topsis")
MODES = ("quick", "detailed")
DIRECTIONS = ("max", "min")
SCAN_STEP = 0.01
PRECISION = 1e-4
_FIELDS = frozenset({"question", "options", "criteria", "scores", "method", "mode"})
_CRITERION_FIELDS = frozenset({"name", "weight", "direction"})


INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["question"],
    "properties": {
        "question": {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS},
        "options": {"type": "array", "minItems": OPTIONS_RANGE[0], "maxItems": OPTIONS_RANGE[1],
                    "uniqueItems": True, "items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}},
        "criteria": {
            "type": "array", "minItems": CRITERIA_RANGE[0], "maxItems": CRITERIA_RANGE[1],
            "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "weight"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                    "weight": {"type": "number", "exclusiveMinimum": 0},
                    "direction": {"enum": list(DIRECTIONS), "default": "max"},
                },
            },
        },
        "scores": {"type": "object", "description": "option -> {criterion -> number}",
                   "additionalProperties": {"type": "object", "additionalProperties": {"type": "number"}}},
        "method": {"enum": list(METHODS), "default": "weighted_sum"},
        "mode": {"enum": list(MODES), "default": "quick"},
    },
}


class DecisionPack:
    pack_type = "decision"
    version = "1.0.0"
    time_limit_sec = 10.0  # milliseconds of arithmetic; the limit only catches a bug
    description = ("Multi-criteria decision analysis (weighted sum or TOPSIS) with an optional "
                   "sensitivity analysis, returned as a signed decision proof.")
    price = {
        "formula": "(base_micros + per_cell_micros * options * criteria) * (detailed_multiplier if mode == 'detailed' else 1)",
        **PRICE,
    }
    input_schema = INPUT_SCHEMA

    def validate(self, inputs: Any) -> dict[str, Any]:
        return _validate(inputs)

    def min_price_micros(self, inputs: dict[str, Any]) -> int:
        # The cost depends only on the shape of the inputs, so the floor is the price.
        return _price(self.validate(inputs))

    def run(self, inputs: dict[str, Any], progress: Progress) -> PackResult:
        # Re-validating is cheap and idempotent; it guarantees run and price see one shape.
        inputs = self.validate(inputs)
        progress(0.0)
        output = _decide(inputs, progress)
        progress(1.0)
        return PackResult(output=output, actual_cost_micros=_price(inputs))


def _price(inputs: dict[str, Any]) -> int:
    cells = len(inputs.get("options", ())) * len(inputs.get("criteria", ()))
    price = PRICE["base_micros"] + PRICE["per_cell_micros"] * cells
    return price * PRICE["detailed_multiplier"] if inputs["mode"] == "detailed" else price


# --- validation -------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to be a float
        return False


def _name_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters"
    return None


def _validate(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidPackInputs({"inputs": ["must be an object"]})
    errors: dict[str, list[str]] = {}

    def add(path: str, message: str) -> None:
        errors.setdefault(path, []).append(message)

    out: dict[str, Any] = {}
    for key in sorted(set(raw) - _FIELDS, key=str):
        add(f"inputs.{key}", "unknown field")

    question = raw.get("question")
    if "question" not in raw:
        add("inputs.question", "required")
    elif not isinstance(question, str):
        add("inputs.question", "must be a string")
    elif not question.strip():
        add("inputs.question", "must not be empty")
    elif len(question) > MAX_QUESTION_CHARS:
        add("inputs.question", f"must be at most {MAX_QUESTION_CHARS} characters")
    else:
        out["question"] = question

    # Known names: an empty set when absent (every reference is unknown), None when the
    # list itself is broken (membership cannot be judged, so it is not reported).
    known_options: set[str] | None = set()
    if "options" in raw:
        options, before = raw["options"], len(errors)
        if not isinstance(options, list):
            add("inputs.options", "must be a list")
        else:
            low, high = OPTIONS_RANGE
            if not low <= len(options) <= high:
                add("inputs.options", f"must have {low} to {high} items")
            seen: dict[str, int] = {}
            for i, item in enumerate(options):
                problem = _name_problem(item)
                if problem is None and item in seen:
                    problem = f"duplicate of inputs.options[{seen[item]}]"
                if problem:
                    add(f"inputs.options[{i}]", problem)
                else:
                    seen[item] = i
        if len(errors) == before:
            out["options"], known_options = list(options), set(options)
        else:
            known_options = None

    known_criteria: set[str] | None = set()
    if "criteria" in raw:
        criteria, before = raw["criteria"], len(errors)
        cleaned = []
        if not isinstance(criteria, list):
            add("inputs.criteria", "must be a list")
        else:
            low, high = CRITERIA_RANGE
            if not low <= len(criteria) <= high:
                add("inputs.criteria", f"must have {low} to {high} items")
            seen = {}
            for i, item in enumerate(criteria):
                path = f"inputs.criteria[{i}]"
                if not isinstance(item, dict):
                    add(path, "must be an object")
                    continue
                for key in sorted(set(item) - _CRITERION_FIELDS, key=str):
                    add(f"{path}.{key}", "unknown field")
                name = item.get("name")
                problem = "required" if "name" not in item else _name_problem(name)
                if problem is None and name in seen:
                    problem = f"duplicate of inputs.criteria[{seen[name]}].name"
                if problem:
                    add(f"{path}.name", problem)
                else:
                    seen[name] = i
                weight = item.get("weight")
                if "weight" not in item:
                    add(f"{path}.weight", "required")
                elif not _is_number(weight):
                    add(f"{path}.weight", "must be a finite number")
                elif weight <= 0:
                    add(f"{path}.weight", "must be greater than 0")
                direction = item.get("direction", "max")
                if not isinstance(direction, str) or direction not in DIRECTIONS:
                    add(f"{path}.direction", 'must be "max" or "min"')
                cleaned.append({"name": name, "weight": weight, "direction": direction})
        if len(errors) == before:
            out["criteria"], known_criteria = cleaned, {c["name"] for c in cleaned}
        else:
            known_criteria = None

    if "scores" in raw:
        scores = raw["scores"]
        if not isinstance(scores, dict):
            add("inputs.scores", "must be an object")
        else:
            for option, row in scores.items():
                path = f"inputs.scores.{option}"
                if known_options is not None and option not in known_options:
                    add(path, "not one of inputs.options")
                if not isinstance(row, dict):
                    add(path, "must be an object")
                    continue
                for criterion, value in row.items():
                    cell = f"{path}.{criterion}"
                    if known_criteria is not None and criterion not in known_criteria:
                        add(cell, "not the name of one of inputs.criteria")
                    if not _is_number(value):
                        add(cell, "must be a finite number")
                    elif abs(value) > MAX_ABS_SCORE:
                        add(cell, f"must be between -{MAX_ABS_SCORE:g} and {MAX_ABS_SCORE:g}")
            out["scores"] = {o: dict(r) for o, r in scores.items() if isinstance(r, dict)}

    for field, allowed, default in (("method", METHODS, "weighted_sum"), ("mode", MODES, "quick")):
        value = raw.get(field, default)
        if not isinstance(value, str) or value not in allowed:
            add(f"inputs.{field}", "must be one of " + ", ".join(f'"{a}"' for a in allowed))
        out[field] = value

    if errors:
        raise InvalidPackInputs(errors)
    return out


# --- analysis ---------------------------------------------------------------------------


class _Model:
    """The part of a method that does not depend on weights, prepared once so the
    sensitivity scan only redoes the cheap, weight-dependent step."""

    def __init__(self, method: str, columns: list[list[float]], directions: list[str]):
        self.method, self.n = method, len(columns[0])
        if method == "weighted_sum":
            self.columns = [_min_max(col, d) for col, d in zip(columns, directions)]
        else:
            self.columns = [_vector(col) for col in columns]
            pick = {"max": (max, min), "min": (min, max)}
            self.ideal = [pick[d][0](col) for col, d in zip(self.columns, directions)]
            self.anti = [pick[d][1](col) for col, d in zip(self.columns, directions)]

    def scores(self, weights: list[float]) -> list[float]:
        if self.method == "weighted_sum":
            return [math.fsum(w * col[i] for w, col in zip(weights, self.columns))
                    for i in range(self.n)]
        out = []
        for i in range(self.n):
            # Weights are > 0 (or 0 at a scan edge), so the weighted ideal is w × ideal.
            plus = math.sqrt(math.fsum((w * (col[i] - b)) ** 2
                                       for w, col, b in zip(weights, self.columns, self.ideal)))
            minus = math.sqrt(math.fsum((w * (col[i] - b)) ** 2
                                        for w, col, b in zip(weights, self.columns, self.anti)))
            out.append(0.5 if plus + minus == 0 else minus / (plus + minus))
        return out


def _min_max(col: list[float], direction: str) -> list[float]:
    low, high = min(col), max(col)
    if high == low:
        return [0.5] * len(col)
    span = high - low
    return [(v - low) / span if direction == "max" else (high - v) / span for v in col]


def _vector(col: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(v * v for v in col))
    return [v / norm for v in col] if norm else [0.0] * len(col)


def _normalised_weights(criteria: list[dict[str, Any]]) -> list[float]:
    if not criteria:
        return []
    # Divide by the largest first so a sum of huge weights cannot overflow to inf.
    top = max(float(c["weight"]) for c in criteria)
    scaled = [float(c["weight"]) / top for c in criteria]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def _ranking(options: list[str], scores: list[float]) -> list[dict[str, Any]]:
    rounded = sorted(zip(options, (round(s, 6) for s in scores)), key=lambda p: (-p[1], p[0]))
    ranking: list[dict[str, Any]] = []
    for position, (option, score) in enumerate(rounded, start=1):
        tied = ranking and ranking[-1]["score"] == score
        ranking.append({"option": option, "score": score,
                        "rank": ranking[-1]["rank"] if tied else position})
    return ranking


def _top(options: list[str], scores: list[float]) -> tuple[str, ...]:
    rounded = [round(s, 6) for s in scores]
    best = max(rounded)
    return tuple(sorted(o for o, s in zip(options, rounded) if s == best))


def _edge(top_at: Callable[[float], tuple[str, ...]], top: tuple[str, ...],
          start: float, end: float) -> float:
    """Farthest weight from `start` towards `end` at which `top` is still first."""
    step = SCAN_STEP if end > start else -SCAN_STEP
    inside, k = start, 0
    while inside != end:
        k += 1
        t = start + k * step
        if (t - end) * step >= 0:
            t = end
        if top_at(t) != top:
            outside = t
            while abs(outside - inside) > PRECISION:
                mid = (inside + outside) / 2
                if top_at(mid) == top:
                    inside = mid
                else:
                    outside = mid
            return inside
        inside = t
    return end


def _sensitivity(model: _Model, options: list[str], criteria: list[dict[str, Any]],
                 weights: list[float], top: tuple[str, ...],
                 progress: Progress) -> dict[str, dict[str, float]]:
    result = {}
    for j, criterion in enumerate(criteria):
        w0 = weights[j]
        if w0 >= 1.0:  # the only criterion (or all others negligible): nothing can move
            low = high = w0
        else:
            def top_at(t: float, j: int = j, w0: float = w0) -> tuple[str, ...]:
                scale = (1.0 - t) / (1.0 - w0)
                shifted = [t if k == j else w * scale for k, w in enumerate(weights)]
                return _top(options, model.scores(shifted))

            low, high = _edge(top_at, top, w0, 0.0), _edge(top_at, top, w0, 1.0)
        result[criterion["name"]] = {"weight": round(w0, 6), "low": round(low, 6),
                                     "high": round(high, 6)}
        progress(0.5 + 0.5 * (j + 1) / len(criteria))
    return result


def _decide(inputs: dict[str, Any], progress: Progress) -> dict[str, Any]:
    options: list[str] = inputs.get("options", [])
    criteria: list[dict[str, Any]] = inputs.get("criteria", [])
    scores: dict[str, dict[str, Any]] = inputs.get("scores", {})
    method, detailed = inputs["method"], inputs["mode"] == "detailed"
    weights = _normalised_weights(criteria)
    analysis: dict[str, Any] = {
        "weights": {c["name"]: round(w, 6) for c, w in zip(criteria, weights)},
        "normalisation": "min-max" if method == "weighted_sum" else "vector",
        "missing_scores": [],
    }
    if detailed:
        analysis["sensitivity"] = {}
    head: dict[str, Any] = {"question": inputs["question"], "method": method}

    has_score = any(scores.get(o) for o in options)
    needed = [name for name, present in (("options", options), ("criteria", criteria),
                                         ("scores", has_score)) if not present]
    if needed:
        return {"verdict": "insufficient_evidence", "needed": needed, "ranking": [],
                **head, "analysis": analysis}

    columns, directions = [], []
    for c in criteria:
        name = c["name"]
        observed = [float(scores[o][name]) for o in options if name in scores.get(o, {})]
        worst = ((min if c["direction"] == "max" else max)(observed)) if observed else 0.0
        columns.append([float(scores[o][name]) if name in scores.get(o, {}) else worst
                        for o in options])
        directions.append(c["direction"])
    analysis["missing_scores"] = [{"option": o, "criterion": c["name"]} for o in options
                                  for c in criteria if c["name"] not in scores.get(o, {})]

    model = _Model(method, columns, directions)
    totals = model.scores(weights)
    ranking, top = _ranking(options, totals), _top(options, totals)
    progress(0.5)
    if detailed:
        analysis["sensitivity"] = _sensitivity(model, options, criteria, weights, top, progress)
    verdict: dict[str, Any] = (
        {"verdict": "recommendation", "recommendation": top[0]} if len(top) == 1
        else {"verdict": "tie", "tied": list(top)})
    return {**verdict, "ranking": ranking, **head, "analysis": analysis}
