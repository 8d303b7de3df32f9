import os

import torch

# The Triton kernels run on CPU through Triton's interpreter. Triton reads the flag when it is first imported
# (importing `kernels` registers the torch custom ops, which imports Triton), so it is set here, before any test
# module of this directory imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
