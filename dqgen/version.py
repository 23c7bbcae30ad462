"""The package version, in a module of its own so that every stage can read it (cache
keys, bundle manifests, header comments) without importing the package's facade."""

__version__ = "0.1.0"
