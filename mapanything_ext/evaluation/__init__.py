"""Evaluation of trained checkpoints: metrics, comparison tables, plots and 3-D exports."""
