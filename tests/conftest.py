import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads the flag when it is first
# imported (importing `kernels` registers the torch custom ops, which imports Triton), so it is set here, before
# any test module imports `kernels`; only tests that name backend="triton" use it (CPU tensors dispatch to the
# reference otherwise).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (and per run): tests must hold on any random input."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
