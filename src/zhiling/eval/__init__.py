"""Evaluation: reference metrics, multiple choice, the judged category suite, and comparison reports.

Model-free parts live here; anything that needs a model takes a callable (``generate`` for answers,
``score_options`` for multiple-choice log-likelihoods) so the inference engine plugs in from outside.
"""
