"""Metrics and checks of a trained model (README "Evaluation")."""
