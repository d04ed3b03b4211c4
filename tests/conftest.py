import os

import pytest

from posttrain.models import load_tokenizer, resolve_model_path
from posttrain.models.numerics import FLAGS_ENV
from tests.helpers import make_tiny

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
