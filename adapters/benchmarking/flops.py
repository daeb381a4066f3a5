"""Model FLOP utilisation (MFU): model FLOPs per trained token, a measured matmul peak, and peak memory.

MFU is the definition of Chowdhery et al. 2022 (PaLM, appendix B): the model FLOPs a training step
needs per token (independent of the implementation: no rematerialisation, no padding) times the
achieved tokens per second, divided by the peak FLOP/s of the hardware. Here the peak is not a data
sheet figure but measured in the same process with one large matmul (fp32 on CPU at the process's
torch thread count, bf16 on CUDA), so MFU says how close a training loop comes to what this machine,
with these threads and this load, does at best.

The count starts from the usual one (Kaplan et al. 2020, "Scaling laws", section 2.1): a matmul of a
weight with P parameters costs 2P FLOPs per token forward, and training costs ~6N per token: 2N
forward, 2N for the gradients with respect to the inputs, 2N for those with respect to the weights.
Parameter-efficient training breaks the second and third terms, so they are counted per matmul,
from the modules of the actual model rather than from a closed form:

- forward: 2 x in x out for every matmul (nn.Linear, including the quantized and LoRA ones, and
  transformers' Conv1D), scaled by the positions it runs on per token (a classifier head on the
  pooled vector runs once per row, not once per token);
- input gradient: another 2 x in x out where the matmul's input requires a gradient, i.e. some
  trainable parameter lies below it (backward stops at the lowest trainable layer);
- weight gradient: another 2 x in x out where its weight is trainable (LoRA A/B, heads, full
  fine-tuning); frozen and quantized base weights get none.
- attention scores and the weighted sum (Narayanan et al. 2021, "Efficient large-scale language
  model training on GPU clusters", section 5.1): QK^T and PV cost 2 x seq x d each per token and
  layer forward (d = heads x head dim, seq = the context each token attends over, causal masking
  not halved, as there); backward costs 2 x seq x d for each of dQ, dK, dV and dP that is needed
  (dV when V requires grad; dP when Q or K does; dQ, dK each when they do).

Biases, norms, activations, softmax and the optimizer are left out (O(d) per token). Embedding
lookups cost no FLOPs; a tied output projection is counted as the matmul it is.

Which inputs require gradients is observed, not guessed: one forward of a short probe sequence
with hooks on every matmul and on the q/k/v projections of each attention block.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Child names of attention blocks whose projections are separate (Llama/Mistral/Qwen, BERT) or fused (GPT-2).
_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED_QKV = "c_attn"


@dataclass
class FlopCount:
    """Model FLOPs of one training step, per trained token (see the module docstring for the formula).

    forward / input_grad / weight_grad: matmuls with weights; attention_forward / attention_backward:
    QK^T and PV. total = all five. matmuls: how many weight matmuls were counted; seq_len: the attention
    context used.
    """

    forward: float = 0.0
    input_grad: float = 0.0
    weight_grad: float = 0.0
    attention_forward: float = 0.0
    attention_backward: float = 0.0
    seq_len: float = 0.0
    matmuls: int = 0
    attention_layers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """FLOPs per trained token of forward + backward."""
        return self.forward + self.input_grad + self.weight_grad + self.attention_forward + self.attention_backward

    @property
    def forward_total(self) -> float:
        """FLOPs per token of the forward pass alone (inference)."""
        return self.forward + self.attention_forward

    def to_dict(self) -> dict:
        """JSON-ready dict with the parts, the total and the formula's sources."""
        return {
            **asdict(self),
            "total": self.total,
            "formula": "per matmul: 2*in*out forward, +2*in*out if its input needs a gradient, +2*in*out if its "
            "weight is trainable (Kaplan et al. 2020 6N, split per matmul); attention 4*seq*d forward per layer, "
            "2*seq*d per needed dQ/dK/dP/dV backward (Narayanan et al. 2021); MFU as Chowdhery et al. 2022 app. B",
        }


def _matmul_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a weight matmul, or None. Quantized Linear subclasses keep in/out_features (their
    weight is packed); transformers' Conv1D stores the weight as [in, out]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def _attention_groups(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """{attention block name: {"q": module, "k": module, "v": module} or {"qkv": module}}."""
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for q, k, v in _QKV_NAMES:
            if q in children and k in children and v in children:
                groups[name] = {"q": children[q], "k": children[k], "v": children[v]}
        if _FUSED_QKV in children:
            groups[name] = {"qkv": children[_FUSED_QKV]}
    return groups


def count_training_flops(
    model: nn.Module, seq_len: float, probe_tokens: int = 16, probe_inputs: dict | None = None
) -> FlopCount:
    """Model FLOPs per trained token of one training step of `model` as it is set up now (which
    parameters are trainable), with attention over `seq_len` tokens of context.

    model: any torch model whose forward takes input_ids (a transformers model, peft-wrapped or not).
    seq_len: the attention context per token; for rows of lengths L_i trained without cross-row
    attention, sum(L_i^2) / sum(L_i) is exact (effective_seq_len). probe_tokens: length of the probe
    row; probe_inputs: the probe's keyword inputs instead ([1, probe_tokens] input_ids of token 1).
    The probe runs one forward with gradients on (its dropout draws do not touch the global random
    state: torch.random.fork_rng). Returns a FlopCount. Raises ValueError when the model has no matmul.
    """
    count = FlopCount(seq_len=float(seq_len))
    seen: dict[nn.Module, list] = {}  # matmul module -> [positions, input requires grad]
    qkv_grad: dict[nn.Module, bool] = {}
    handles = []

    def on_matmul(module, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        positions = x.numel() // max(1, _matmul_shape(module)[0])
        entry = seen.setdefault(module, [0, False])
        entry[0] += positions
        entry[1] = entry[1] or x.requires_grad

    def on_projection(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        qkv_grad[module] = qkv_grad.get(module, False) or bool(getattr(out, "requires_grad", False))

    for module in model.modules():
        if _matmul_shape(module) is not None:
            handles.append(module.register_forward_hook(on_matmul))
    groups = _attention_groups(model)
    for parts in groups.values():
        for part in parts.values():
            handles.append(part.register_forward_hook(on_projection))
    device = next(model.parameters()).device
    inputs = probe_inputs or {"input_ids": torch.ones((1, probe_tokens), dtype=torch.long, device=device)}
    tokens = int(inputs["input_ids"].numel())
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__}: no nn.Linear or Conv1D ran in the probe forward")
    for module, (positions, input_grad) in seen.items():
        fan_in, fan_out = _matmul_shape(module)
        per_token = 2.0 * fan_in * fan_out * positions / tokens
        count.matmuls += 1
        count.forward += per_token
        if input_grad:
            count.input_grad += per_token
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            count.weight_grad += per_token
    for parts in groups.values():
        _add_attention(count, parts, qkv_grad, seq_len)
    return count


def _add_attention(count: FlopCount, parts: dict, qkv_grad: dict, seq_len: float) -> None:
    """Add one attention block's QK^T and PV FLOPs per token (Narayanan et al. 2021) to count."""
    if "qkv" in parts:
        fused = parts["qkv"]
        if fused not in qkv_grad:
            return
        width = _matmul_shape(fused)[1] // 3
        q_grad = k_grad = v_grad = qkv_grad[fused]
    else:
        if parts["q"] not in qkv_grad:
            return  # this block did not run in the probe
        width = _projection_width(parts["q"])
        q_grad, k_grad, v_grad = (qkv_grad.get(parts[p], False) for p in ("q", "k", "v"))
    unit = 2.0 * seq_len * width
    count.attention_layers += 1
    count.attention_forward += 2 * unit
    needed = int(q_grad) + int(k_grad) + int(q_grad or k_grad) + int(v_grad)  # dQ, dK, dP, dV
    count.attention_backward += needed * unit


def _projection_width(module: nn.Module) -> int:
    """Output width of a (possibly LoRA-wrapped) projection: heads x head dim for q."""
    shape = _matmul_shape(module)
    if shape is not None:
        return shape[1]
    base = getattr(module, "base_layer", None)
    if base is not None and _matmul_shape(base) is not None:
        return _matmul_shape(base)[1]
    return int(module.out_features)


def effective_seq_len(lengths) -> float:
    """sum(L^2) / sum(L) over row lengths L: the mean context a token attends over when each row
    attends only within itself (what FlopCount.seq_len wants). 0.0 for no rows."""
    lengths = [int(n) for n in lengths]
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


# ---------------------------------------------------------------- the peak the model FLOPs are divided by
def measure_peak_flops(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    size: int | None = None,
    repeats: int = 8,
) -> dict:
    """Peak dense matmul FLOP/s measured now: the best of `repeats` timed [size, size] @ [size, size]
    products (2 x size^3 FLOPs each) after a warm-up.

    device: default cuda when available, else cpu; dtype: default bf16 on cuda, fp32 on cpu; size:
    default 8192 on cuda, 2048 on cpu. On the CPU the product uses torch's current thread count, the
    one the training in the same process uses. Returns {"flops_per_second", "size", "dtype", "device",
    "threads", "repeats", "best_seconds"}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    size = size or (8192 if on_cuda else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn((size, size), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    b = torch.randn((size, size), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    inner = 10 if on_cuda else 1  # a CUDA matmul of 8192 takes ~1 ms: time several per sync
    best = float("inf")
    for i in range(repeats + 1):
        if on_cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        if on_cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / inner
        if i:  # the first is the warm-up
            best = min(best, seconds)
    return {
        "flops_per_second": 2.0 * size**3 / best,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "best_seconds": best,
    }


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_second: float) -> float:
    """Model FLOP utilisation (Chowdhery et al. 2022, appendix B): tokens/s x model FLOPs per token /
    peak FLOP/s, a fraction (0.55 = 55%)."""
    return tokens_per_second * flops_per_token / peak_flops_per_second


def peak_memory_bytes() -> dict:
    """This process's peak memory so far: {"rss_high_water_bytes"} (getrusage's ru_maxrss: KiB on
    Linux, bytes on macOS) and, with CUDA, {"cuda_max_allocated_bytes", "cuda_max_reserved_bytes"}."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_high_water_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded (what a shared machine's timings depend on)."""
    return [round(x, 2) for x in os.getloadavg()]
