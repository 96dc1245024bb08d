"""Evaluation of registrations on labelled pairs: overlap, surface distance, regularity, with baselines."""
