"""Multi-step jobs that combine the core (compressor), exporters and profilers: the layer between the CLI and them."""
