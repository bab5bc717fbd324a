"""Typed configuration; this package's modules split declarations from loading and checks."""

from daemon.config.schema import *  # noqa: F403 - step one of the split: the module as it was
