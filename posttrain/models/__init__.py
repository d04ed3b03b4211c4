"""Model loading, dtype/device choice, LoRA and full fine-tuning set-up, and the blocks that run a model on a batch
(forward, reference, heads).

Layer 2: may import data, losses, io and errors; never engine, methods or config."""

from posttrain.models.loading import (
                                      Loaded,
                                      cache_dir,
                                      choose_device,
                                      choose_dtype,
                                      load_model,
                                      load_tokenizer,
                                      resolve_model_path,
)
from posttrain.models.lora import apply_lora, format_trainable, load_adapter, prepare_full, trainable_report
from posttrain.models.quant import Quantization, dequantize_, format_weight_bytes, weight_bytes

__all__ = ["Loaded", "Quantization", "apply_lora", "cache_dir", "choose_device", "choose_dtype", "dequantize_",
           "format_trainable", "format_weight_bytes", "load_adapter", "load_model", "load_tokenizer", "prepare_full",
           "resolve_model_path", "trainable_report", "weight_bytes"]
