"""posttrain: post-training for causal language models (SFT, preference learning, RL, evaluation, shipping)."""

__version__ = "0.1.0"


def _drop_hub_kernel_warning() -> None:
    """bitsandbytes, imported (by PEFT, on every run) on a CPU with AVX512-BF16, tries to fetch a bf16 kernel from the
    Hugging Face hub and logs a warning when it cannot. posttrain never runs that kernel (models/quant.py,
    keep_4bit_precision, says so once instead), so the warning only misleads; other bitsandbytes messages pass."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())


_drop_hub_kernel_warning()
