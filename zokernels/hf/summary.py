"""`python -m zokernels.hf.summary RUN_DIR [...]`: the markdown results table of finetune runs, made
from their metrics.json (the README's numbers come from here, never typed by hand)."""
from __future__ import annotations

import json
import os
import sys

HEADER = ("| device | ZO tunes | steps x batch, seed | test examples | zero-shot | ZO fine-tuned | gain (points) "
          "| McNemar p | first-order | wall time |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def row(metrics: dict) -> str:
    cfg, zo, fo = metrics["config"], metrics["zo"], metrics.get("fo")
    quant, zs = metrics.get("quant"), metrics["zero_shot"]
    tunes = cfg["tune"] + (f" x{cfg.get('tune_layers', 1)}" if cfg["tune"] == "last-layers" else "")
    if cfg.get("tune_linears"):
        tunes += f" ({','.join(cfg['tune_linears'])})"
    if quant and metrics.get("optimizer") == "QuZO":
        tunes = f"{tunes}: QuZO, {metrics['trainable_params']:,} {quant['fmt']} weights"
    else:
        tunes = f"{tunes} ({metrics['trainable_params']:,} params)" + (f", {quant['fmt']} base" if quant else "")
    zero_shot = _pct(zs["test_accuracy"])
    if quant:  # the zero-shot that the gain is measured from is the quantized model's
        zero_shot += f" ({quant['fmt']}" + (f"; float {_pct(zs['float_model_test_accuracy'])})"
                                            if zs.get("float_model_test_accuracy") is not None else ")")
    cells = [cfg["device"], tunes,
             f"{zo['steps']} x {cfg['batch_size']}, q={cfg['n_queries']}, seed {cfg.get('seed', 0)}", str(metrics["n_test"]),
             zero_shot, _pct(zo["test_accuracy"]), f"{zo['gain_points']:+.1f}",
             f"{zo['mcnemar_vs_zero_shot']['p_value']:.3g}", _pct(fo["test_accuracy"]) if fo else "not run",
             f"{metrics['seconds']['total'] / 60:.1f} min"]
    return "| " + " | ".join(cells) + " |"


def table(run_dirs: list[str]) -> str:
    rows = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.json")) as fh:
            rows.append(row(json.load(fh)))
    return "\n".join([HEADER, *rows])


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m zokernels.hf.summary RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    missing = [d for d in argv if not os.path.isfile(os.path.join(d, "metrics.json"))]
    if missing:
        print(f"error: no metrics.json in {', '.join(missing)} (a finished `python -m zokernels finetune "
              "--output-dir DIR` run writes it)", file=sys.stderr)
        return 2
    print(table(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
