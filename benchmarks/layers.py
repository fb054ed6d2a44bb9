"""Layer benchmark: time and peak extra memory of PAM (fused vs manual), CAM, EMA and non-local at
N = 16^3, 24^3 and 32^3 tokens with C = 64, one process per measurement. Writes docs/benchmarks.md.

    python -m benchmarks.layers [--edges 16,24,32] [--modes infer,train]
"""

from __future__ import annotations

import argparse

from benchmarks._report import run_isolated, table, write_section

LAYERS = ["pam_fused", "pam_manual", "cam", "ema", "nonlocal"]
LABELS = {
    "pam_fused": "PAM fused (SDPA)",
    "pam_manual": "PAM manual (bmm + softmax)",
    "cam": "CAM",
    "ema": "EMA (K=64, T=3)",
    "nonlocal": "non-local (pooled)",
}


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edges", default="16,24,32")
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    edges = [int(e) for e in args.edges.split(",")]

    rows, results = [], {}
    for mode in args.modes.split(","):
        for layer in LAYERS:
            for edge in edges:
                payload = {"layer": layer, "edge": edge, "channels": args.channels, "mode": mode}
                r = run_isolated("benchmarks._layer_worker", payload)
                results[(mode, layer, edge)] = r
                row = {"mode": mode, "layer": LABELS[layer], "tokens": f"{edge}^3 = {edge**3:,}"}
                if "error" in r:
                    row.update(ms="-", mib=f"failed: {r['error']}")
                else:
                    row.update(ms=f"{r['seconds'] * 1e3:,.1f}", mib=_mib(r["extra_bytes"]))
                rows.append(row)
                print(row, flush=True)

    notes = []
    for mode in args.modes.split(","):
        fused, manual = results.get((mode, "pam_fused", 32), {}), results.get((mode, "pam_manual", 32), {})
        if "extra_bytes" in fused and "extra_bytes" in manual:
            ratio = fused["extra_bytes"] / manual["extra_bytes"]
            target = "meets" if ratio <= 0.1 else "MISSES"
            notes.append(
                f"- {mode}: fused PAM at 32^3 uses {_mib(fused['extra_bytes'])} MiB of extra memory against "
                f"{_mib(manual['extra_bytes'])} MiB for the manual path, a ratio of {ratio:.3f} ({target} the "
                f"target of at most 0.1); it runs {manual['seconds'] / fused['seconds']:.1f}x faster."
            )
    body = (
        "### Attention layers, C = 64, batch 1\n\n"
        "`infer`: one forward under `torch.no_grad()`; `train`: forward + backward of the sum of the output. "
        "Time: median of 3 runs after the first. Extra memory: the process's peak RSS during the first run "
        "minus its peak after building the input and the layer (each measurement in a fresh process).\n\n"
        + table(
            rows,
            [
                ("mode", "mode"),
                ("layer", "layer"),
                ("tokens", "tokens N"),
                ("ms", "time (ms)"),
                ("mib", "extra memory (MiB)"),
            ],
        )
        + "\n\n"
        + "\n".join(notes)
    )
    write_section("layers", body)


if __name__ == "__main__":
    main()
