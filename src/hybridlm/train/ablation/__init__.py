"""Ablations of hybrid designs (``hybridlm ablate``): variants, the run protocol and the report."""
