"""The package version, importable by submodules without importing the package itself."""

__version__ = "0.1.0"
