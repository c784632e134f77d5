"""pytest plugin of npu-harness (registered through the ``pytest11`` entry point).

Kept tiny at import time: loading pytest must not import torch or transformers.
"""
