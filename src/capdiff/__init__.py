"""capdiff: train one model to caption images and to generate them."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from capdiff import Pipeline` without importing torch and the models for every `import capdiff`.
    if name == "Pipeline":
        from capdiff.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'capdiff' has no attribute {name!r}")
