"""Looking at what dictionaries learned: dashboards, sparse probing, autointerp and
SAE / transcoder / skip transcoder comparisons."""
