"""The `tl-transcoders` command and the demo it runs."""

__all__: list[str] = []  # the names live in the modules of this package
