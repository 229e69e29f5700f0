"""capdiff: train one model to caption images and to generate them."""

__version__ = "0.1.0"
