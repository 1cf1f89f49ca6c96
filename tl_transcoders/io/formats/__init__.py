"""Readers (and a writer) of other libraries' transcoder files, one module per library;
the entry points are in `tl_transcoders.io.loading`."""

__all__: list[str] = []  # the names live in the modules of this package
