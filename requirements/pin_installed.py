"""Print pip constraints that keep the already-installed torch and triton (if any) in place."""
import importlib.metadata as md

for dist in ("torch", "triton"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
