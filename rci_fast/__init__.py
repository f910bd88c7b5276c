"""rci_fast: a fast, hand-written trainer for LLMs that reason with a code interpreter.

Importing the package is cheap: subpackages (sandbox, kernels, ...) are imported on use.
"""
__version__ = "0.1.0"
