"""Data pipeline: raw formats -> canonical records -> templates -> tokenized, cached training data."""
