"""Print the tables of docs/scaling.md: bytes per GPU and collective volume per step, from formulas.

Computed, not measured: parameter counts from the published Llama-2 shapes, state sizes from the
byte counts of each optimizer (docs/scaling.md explains every term). Run:
``python tools/scaling_note.py`` (no GPU, no model download).
"""
from __future__ import annotations

GB = 1e9
N_GPU = 8
GPU_BYTES = 80 * GB
RATIOS = (0.01, 0.05, 0.2)


def llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int = 32000) -> dict:
    """Parameter counts of a Llama-2 model: per decoder layer and in total (untied embeddings)."""
    head = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head  # q, o + k, v (grouped-query for 70B)
    mlp = 3 * hidden * inter
    layer = attn + mlp + 2 * hidden  # + two RMSNorm weights
    total = layers * layer + 2 * vocab * hidden + hidden  # + embed, lm_head, final norm
    return {"layer": layer, "total": total, "embed": vocab * hidden}


MODELS = {
    "Llama-2-7B": llama(4096, 11008, 32, 32, 32),
    "Llama-2-70B": llama(8192, 28672, 80, 64, 8),
}

MASK_BITS = 1 / 8          # B/param: the mask, one bit per weight
DIRECTORY = 8 / 4096       # B/param: one int64 directory entry per 4096 elements


def per_gpu(P: float, N: int, kind: str, r: float = 0.0) -> dict:
    """Sharded bytes per GPU (weights, gradients, optimizer state), bf16 weights everywhere."""
    if kind == "adamw_zero3":
        parts = {"weights": 2 * P, "grads": 2 * P, "state": 12 * P}  # fp32 master + m + v
    elif kind == "masked_fsdp2_dense":
        parts = {"weights": 2 * P, "grads": 2 * P, "state": (12 * r + MASK_BITS + DIRECTORY) * P}
    elif kind == "masked_fsdp2_compact":
        parts = {"weights": 2 * P, "grads": 4 * r * P, "state": (12 * r + MASK_BITS + DIRECTORY) * P}
    elif kind == "masked_ddp":  # nothing sharded; DDP's buckets hold a dense bf16 gradient
        parts = {"weights": 2 * P, "grads": 2 * P, "state": (12 * r + MASK_BITS + DIRECTORY) * P}
        N = 1
    else:
        raise ValueError(kind)
    out = {k: v / N for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def transient(m: dict, kind: str) -> float:
    """Unsharded buffers alive at the peak of a step: two gathered bf16 layers (current + prefetch)
    and one layer's unsharded bf16 gradient before its reduce-scatter; compact mode also holds the
    dense sharded gradients of the FSDP unit being compacted (the largest unit: a decoder layer or
    the root's embedding + lm_head, / N). DDP: nothing is gathered."""
    if kind == "masked_ddp":
        return 0.0
    t = 2 * 2 * m["layer"] + 2 * m["layer"]
    if kind == "masked_fsdp2_compact":
        t += 2 * max(m["layer"], 2 * m["embed"]) / N_GPU
    return t


def comm(P: float, N: int) -> dict:
    """Bytes each rank sends (= receives) per optimizer step, bf16, ring algorithms."""
    f = (N - 1) / N
    return {"all_gather": 2 * 2 * P * f,  # forward + backward re-gather (reshard_after_forward)
            "reduce_scatter": 2 * P * f}


def main() -> None:
    print(f"| model | params | setup | ratio | weights | grads | optimizer state | sharded total | + transient "
          f"| fits {GPU_BYTES / GB:.0f} GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in MODELS.items():
        P = m["total"]
        rows = [("dense AdamW + ZeRO-3", "adamw_zero3", None)]
        for r in RATIOS:
            rows.append(("MaskedAdamW + FSDP2, dense grads", "masked_fsdp2_dense", r))
            rows.append(("MaskedAdamW + FSDP2, compact grads", "masked_fsdp2_compact", r))
            rows.append(("MaskedAdamW + DDP (no sharding)", "masked_ddp", r))
        for label, kind, r in rows:
            b = per_gpu(P, N_GPU, kind, r or 0.0)
            peak = b["total"] + transient(m, kind)
            print(f"| {name} | {P / 1e9:.2f} B | {label} | {'-' if r is None else r} | {b['weights'] / GB:.2f} | "
                  f"{b['grads'] / GB:.2f} | {b['state'] / GB:.2f} | {b['total'] / GB:.2f} | {peak / GB:.2f} | "
                  f"{'yes' if peak < GPU_BYTES else 'no'} |")
    print()
    print("| model | all-gather / rank / step | reduce-scatter / rank / step | DDP dense all-reduce | "
          "DDP compact all-reduce r=0.01 / 0.05 / 0.2 |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in MODELS.items():
        P = m["total"]
        c = comm(P, N_GPU)
        f = 2 * (N_GPU - 1) / N_GPU
        ddp_dense = f * 2 * P
        ddp_compact = " / ".join(f"{f * 4 * r * P / GB:.2f}" for r in RATIOS)
        print(f"| {name} | {c['all_gather'] / GB:.1f} GB | {c['reduce_scatter'] / GB:.1f} GB | "
              f"{ddp_dense / GB:.1f} GB | {ddp_compact} GB |")


if __name__ == "__main__":
    main()
