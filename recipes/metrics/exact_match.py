"""Exact match as an ``evaluate`` metric module, shipped so evaluation works offline.

``evaluate.load("recipes/metrics/exact_match.py")`` loads it without the Hub. A prediction
counts when it equals its reference after stripping surrounding whitespace.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after stripping surrounding whitespace."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, same length.
Returns:
    exact_match: float in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Whitespace-stripped string equality, averaged over examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
