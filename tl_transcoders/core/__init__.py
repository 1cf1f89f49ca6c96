"""The transcoder itself, with no model attached: its config, activation functions, the
sparse kernels, the `Transcoder` module and its native file format."""

__all__: list[str] = []  # the names live in the modules of this package
