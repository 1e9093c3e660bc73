"""Analyses of trained models (routing statistics and plots); see routing.py."""
