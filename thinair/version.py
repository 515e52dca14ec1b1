"""The version of thinair (the package re-exports it as thinair.__version__)."""

__version__ = "0.1.0"
