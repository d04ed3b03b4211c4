import os

# Before torch loads: ATen picks its AVX512 kernels where a CPU has them, and their softmax and reductions round
# differently in the last bit from the AVX2 ones, enough to flip a token sampled from the tiny random model, so the
# golden runs would depend on the machine. Every test runs ATen's AVX2 kernels, the floor of the machines this
# project lands on (subprocesses inherit it); a shell that sets the variable keeps its own choice.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest  # noqa: E402

from posttrain.models import load_tokenizer, resolve_model_path  # noqa: E402
from posttrain.models.numerics import FLAGS_ENV  # noqa: E402
from tests.helpers import make_tiny  # noqa: E402

# model.dtype=auto means fp32 in every test, on CPUs with and without native bf16 alike (subprocesses inherit it);
# tests/test_numerics.py forces each branch of the rule itself.
os.environ[FLAGS_ENV] = ""


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """The embedded SmolLM2 converted to safetensors (cached once per machine)."""
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny(tmp_path_factory.mktemp("tiny"), tokenizer)
