"""The `tl-transcoders` command and the demo it runs."""
