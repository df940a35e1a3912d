"""Tooling around the model: the `points` command line (`cli`, `convert`, `demo`, `bench`), random-weight
checkpoints in the released layout (`synthetic`), and the transformers reference that the tests, the bench
and tools/ compare against (`reference`; needs transformers, a test-only dependency)."""

from points import submodules

__getattr__ = submodules(__name__)  # `points.tooling.NAME` imports the module NAME on first use
