"""Files from elsewhere: other libraries' transcoder formats, loading by path or Hub
name, export to circuit-tracer, and text corpora as token batches."""

__all__: list[str] = []  # the names live in the modules of this package
