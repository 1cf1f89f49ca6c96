"""A transcoder meets a TransformerLens model: hook sites, splice, loading models and
the checks of token input, one hook-based path for both model classes."""

__all__: list[str] = []  # the names live in the modules of this package
