"""A user's own package of networks for the tests: what `--model userpkg.nets:FACTORY` imports."""

__version__ = "0.3.1"
