"""The graph viewer's page, script and style, served by `tl_transcoders.app.serve`, with
d3 7.9.0 (`d3.min.js`, from the npm package `d3`; ISC licence in `LICENSE-d3`)."""
