"""Pack inputs the tests share, with what they cost."""

DECISION = {
    "question": "Which database?",
    "options": ["Postgres", "MySQL"],
    "criteria": [{"name": "cost", "weight": 1, "direction": "min"}, {"name": "features", "weight": 2}],
    "scores": {"Postgres": {"cost": 1, "features": 9}, "MySQL": {"cost": 1, "features": 7}},
}
# Public price: 0.005 USD + 0.0002 USD per option x criterion cell.
DECISION_COST_MICROS = 5_000 + 200 * 2 * 2
