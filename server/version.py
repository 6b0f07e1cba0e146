"""The installed distribution's version, read from its metadata (the server sits below the CLI package that
defines it, so it does not import it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("glm4v-edge")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+source"
