"""adapters.benchmarking.flops: the hook-based count against hand-computed counts from the config."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.benchmarking.flops import count_training_flops, effective_seq_len, measure_peak_flops, mfu

H, I, L, HEADS, KV, VOCAB, R, SEQ = 64, 176, 3, 4, 2, 300, 8, 40.0


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def hand_count_lora_qv() -> float:
    """LoRA r on q_proj and v_proj of every block, everything else frozen, computed from the config."""
    hd = H // HEADS
    q, kv, o, mlp = H * HEADS * hd, H * KV * hd, HEADS * hd * H, 3 * H * I
    per_layer = q + 2 * kv + o + mlp
    # the LoRA matmuls: q: A h->r, B r->q_out; v: A h->r, B r->kv_out
    lora_q, lora_v = H * R + R * HEADS * hd, H * R + R * KV * hd
    forward = 2 * (L * per_layer + VOCAB * H) + 2 * L * (lora_q + lora_v)
    weight_grad = 2 * L * (lora_q + lora_v)
    # input gradients: layer 0's q/k/v projections and LoRA A see an input with no gradient (nothing
    # trainable below); its LoRA B do (A is trainable). From o_proj of layer 0 upwards every input does.
    layer0 = o + mlp + R * HEADS * hd + R * KV * hd
    upper = (L - 1) * (per_layer + lora_q + lora_v)
    input_grad = 2 * (layer0 + upper + VOCAB * H)
    d = HEADS * hd
    attn_fwd = L * 4 * SEQ * d
    # layer 0: dQ, dP, dV (K is frozen with no gradient below); upper layers: dQ, dK, dP, dV
    attn_bwd = 3 * 2 * SEQ * d + (L - 1) * 4 * 2 * SEQ * d
    return forward + weight_grad + input_grad + attn_fwd + attn_bwd


def test_lora_count_matches_hand_count():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=R, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    count = count_training_flops(model, seq_len=SEQ)
    assert count.total == pytest.approx(hand_count_lora_qv(), rel=1e-12)
    assert count.attention_layers == L
    # the probe leaves the global random state alone (dropout drew inside a forked RNG)
    state = torch.random.get_rng_state()
    count_training_flops(model, seq_len=SEQ)
    assert torch.equal(state, torch.random.get_rng_state())


def test_all_trainable_approaches_6n():
    model = tiny_llama(tie=True)
    count = count_training_flops(model, seq_len=SEQ)
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding is the output projection, once
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    attention = 3 * L * 4 * SEQ * H  # forward 4*seq*d, backward twice that
    assert count.attention_forward + count.attention_backward == pytest.approx(attention)
    assert count.total - attention == pytest.approx(6 * (n - norms))
    assert (count.total - attention) / (6 * n) == pytest.approx(1.0, rel=0.01)


def test_frozen_top_only_stops_backward():
    """Only the top block's LoRA trains: the blocks below need no input gradients at all."""
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=R, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[L - 1])
    )
    top = count_training_flops(model, seq_len=SEQ)
    every = count_training_flops(
        get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=16, target_modules=["q_proj", "v_proj"])), SEQ
    )
    assert top.forward < every.forward and top.input_grad < every.input_grad / 2
    assert top.attention_layers == L and top.attention_backward == pytest.approx(3 * 2 * SEQ * H)


def test_effective_seq_len_and_mfu():
    assert effective_seq_len([10, 10]) == 10
    assert effective_seq_len([1, 3]) == pytest.approx((1 + 9) / 4)
    assert mfu(100.0, 1e9, 2e11) == pytest.approx(0.5)


def test_measured_peak_agrees_with_a_timed_matmul():
    peak = measure_peak_flops(device="cpu", size=256, repeats=3)
    assert peak["flops_per_second"] > 0 and peak["threads"] == torch.get_num_threads()
    assert peak["flops_per_second"] == pytest.approx(2 * 256**3 / peak["best_seconds"])
