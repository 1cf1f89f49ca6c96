"""Looking at what dictionaries learned: dashboards, sparse probing, autointerp and
SAE / transcoder / skip transcoder comparisons."""

__all__: list[str] = []  # the names live in the modules of this package
