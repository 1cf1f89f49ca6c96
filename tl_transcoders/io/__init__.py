"""Files from elsewhere: other libraries' transcoder formats, loading by path or Hub
name, export to circuit-tracer, and text corpora as token batches."""
