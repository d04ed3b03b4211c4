"""Which adapter folders a client may load: only what lies inside the configured adapter directory."""

from __future__ import annotations

from pathlib import Path

from posttrain.serve.api import ServeError


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def resolve_in_dir(root: Path, lora_path: str) -> Path:
    """The adapter folder ``lora_path`` names (relative to ``root``, or absolute but inside it), every symlink
    resolved: 403 for anything that leads outside ``root``, 404 when absent, 400 when it holds no adapter.

    Containment is checked before existence, so a client learns nothing about paths outside the directory.
    """
    root = root.resolve()
    try:
        target = (root / lora_path).resolve()  # joining an absolute path keeps it as it is
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops
        raise ServeError(400, f"bad lora_path {lora_path!r}: {exc}", param="lora_path") from exc
    if not _inside(root, target):
        raise ServeError(403, f"lora_path {lora_path!r} is outside the adapter directory", param="lora_path")
    if not target.exists():
        raise ServeError(404, f"no adapter at {lora_path!r} in the adapter directory", param="lora_path")
    folder = target if (target / "adapter_config.json").exists() else target / "adapter"
    if not (folder / "adapter_config.json").exists():
        raise ServeError(400, f"{lora_path!r} is neither a PEFT adapter folder nor a run folder with adapter/ in "
                              "it", param="lora_path")
    folder = folder.resolve()
    # A run's adapter/ or a weights file may itself be a link out of the directory.
    if not _inside(root, folder) or any(not _inside(root, f.resolve()) for f in folder.iterdir()):
        raise ServeError(403, f"lora_path {lora_path!r} links outside the adapter directory", param="lora_path")
    return folder


def discover(root: Path) -> list[str]:
    """Names of the subfolders of ``root`` that hold an adapter (directly, or a run folder's adapter/)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and
                  ((p / "adapter_config.json").exists() or (p / "adapter" / "adapter_config.json").exists()))


def training_base(folder: Path) -> dict:
    """What the adapter's base was in training: ``init_adapter`` (trained on top of another adapter) and
    ``quantization`` (a 4-bit base), from the run's config.yaml beside or above the folder, or the
    export_report.json that ``posttrain export`` writes. Empty when neither is there."""
    import yaml

    for name in ("config.yaml", "export_report.json"):
        for path in (folder / name, folder.parent / name):
            if not path.is_file():
                continue
            try:
                run = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
            except (OSError, yaml.YAMLError):
                return {}
            if not isinstance(run, dict):
                return {}
            model = run.get("model") if name == "config.yaml" else run
            if not isinstance(model, dict):
                return {}
            quant = model.get("quantization")
            return {"init_adapter": model.get("init_adapter"), "quantization": None if quant == "none" else quant}
    return {}


def check_servable(folder: Path, lora_path: str, quantization: str | None) -> None:
    """Refuse (400) an adapter that would not behave on this base as it did in training: one trained on top of
    another adapter, or against a base quantized otherwise than ``quantization`` (None: full precision)."""
    trained = training_base(folder)
    if trained.get("init_adapter"):  # e.g. DPO after SFT: alone, it would silently lack the SFT changes
        raise ServeError(400, f"{lora_path!r} was trained on top of adapter {trained['init_adapter']}, and a "
                              "row takes one adapter: merge the run (posttrain merge) and serve the result with "
                              "--model", param="lora_path")
    if trained.get("quantization") and trained["quantization"] != quantization:
        # A QLoRA adapter learned to correct the 4-bit base's rounding; on the full-precision base its outputs
        # differ (in tests, greedy answers changed on most prompts).
        raise ServeError(400, f"{lora_path!r} was trained against a {trained['quantization']} base: start the "
                              f"server with --quantization {trained['quantization']}, or serve the output of "
                              "`posttrain merge` (merged into the de-quantized base) with --model",
                         param="lora_path")
