"""Model benchmark on a 96^3 patch: parameters, GFLOPs and CPU forward time in fp32 and bf16 for every
registered variant, side by side with MONAI's AttentionUnet of the same channels, in one run.

    python -m benchmarks.models [--patch 96] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse

from attention3d import list_models
from benchmarks._report import has_native_bf16, run_isolated, table, write_section

PEER = "monai_attention_unet"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--models", default=",".join([*list_models(), PEER]))
    parser.add_argument(
        "--bf16-models",
        default=None,
        help="models timed in bf16 (default: all where bf16 is native, else attention_unet and the peer)",
    )
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    native = has_native_bf16()
    bf16_models = args.bf16_models.split(",") if args.bf16_models else None
    if bf16_models is None:
        bf16_models = args.models.split(",") if native else ["attention_unet", PEER]
    # Emulated bf16 convolutions take minutes per forward: then the first forward alone is timed.
    bf16_repeats = 3 if native else 0

    rows, by_model = [], {}
    for name in args.models.split(","):
        row = {"model": f"{name} (peer)" if name == PEER else name}
        for i, precision in enumerate(precisions):
            if precision == "bf16" and name not in bf16_models:
                row[precision] = "not run"
                continue
            payload = {"model": name, "patch": args.patch, "precision": precision, "flops": i == 0}
            payload["repeats"] = bf16_repeats if precision == "bf16" else 3
            r = run_isolated("benchmarks._model_worker", payload)
            if "error" in r:
                row[precision] = f"failed: {r['error']}"
                continue
            if i == 0:
                row["params"] = f"{r['params'] / 1e6:.2f}"
                row["gflops"] = f"{r['flops'] / 1e9:.1f}"
                row["mib"] = f"{r['extra_bytes'] / 2**20:,.0f}"
            row[precision] = f"{r['seconds']:.2f}" + ("" if r["finite"] else " (non-finite!)")
            by_model[(name, precision)] = r["seconds"]
        rows.append(row)
        print(row, flush=True)

    notes = []
    for precision in precisions:
        peer, ours = by_model.get((PEER, precision)), by_model.get(("attention_unet", precision))
        if peer and ours:
            notes.append(
                f"- {precision}: seg3d `attention_unet` {ours:.2f} s vs MONAI `AttentionUnet` {peer:.2f} s "
                f"({peer / ours:.2f}x)."
            )
    if "bf16" in precisions and not native:
        notes.append(
            "- bf16 on this CPU: it has neither AVX512-BF16 nor AMX, so PyTorch emulates bf16 convolutions and they "
            "run far slower than fp32; only `attention_unet` and the peer were timed in bf16, a single forward "
            "each. Inference should therefore default to fp32 on such CPUs."
        )
    columns = [("model", "model"), ("params", "params (M)"), ("gflops", "GFLOPs"), ("mib", "fp32 extra memory (MiB)")]
    columns += [(p, f"CPU forward {p} (s)") for p in precisions]
    body = (
        f"### Models on a {args.patch}^3 patch, batch 1, channels (16, 32, 64, 128, 256), strides 2\n\n"
        "GFLOPs: one forward pass counted by `torch.utils.flop_counter` (a multiply-add = 2 FLOPs; convolutions, "
        "matmuls and attention kernels; element-wise ops not counted). Time: median of 3 eval-mode forwards under "
        "`torch.no_grad()` after one warm-up; bf16 through `torch.autocast('cpu')`. Extra memory: peak RSS of the "
        "first fp32 forward over the peak after building the model and input, in a fresh process.\n\n"
        + table(rows, columns)
        + "\n\n"
        + "\n".join(notes)
    )
    write_section("models", body)


if __name__ == "__main__":
    main()
