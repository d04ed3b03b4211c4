"""OpenAI-compatible serving of one base model with many LoRA adapters, batched together in each forward.

Layer 6: may import models, rollout, runs, io and errors; never config (its command line is posttrain/cli/serve.py)."""

from posttrain.serve.api import Sampling, ServeError
from posttrain.serve.engine import BASE, Engine
from posttrain.serve.scheduler import Request, Scheduler
from posttrain.serve.server import Server, serve

__all__ = ["BASE", "Engine", "Request", "Sampling", "Scheduler", "ServeError", "Server", "serve"]
