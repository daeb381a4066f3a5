"""Running a causal LM on packed rows (adapters.data.packing) so that each packed sequence sees only itself.

No attention mask and no KV cache go to the model: transformers (5.x,
``masking_utils.find_packed_sequence_indices``) then reads the position_ids restarts and builds a
block-diagonal causal mask, under eager, SDPA (CPU included) and flash attention alike. With
``use_cache`` on, as a model's config has it by default, the forward pass makes an empty cache and
transformers skips that detection: every token would see the sequences packed before it.
"""

from __future__ import annotations

import torch

from adapters.errors import ConfigError


def packed_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor):
    """The model's output on packed rows: input_ids, position_ids [batch, seq] (restarting at 0 for each
    packed row) and logits_to_keep, a bool [batch, seq] of the positions whose logits are needed
    (out.logits is then [kept, vocab]). No attention mask and use_cache=False (see the module doc)."""
    return model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, use_cache=False)


@torch.no_grad()
def check_packing_support(model) -> None:
    """Raise ConfigError unless `model` (a transformers causal LM, possibly peft-wrapped) keeps packed
    rows apart: probed on one packed row of two short sequences, the second's logits must equal its
    logits alone. Architectures whose code does not give position_ids to transformers' mask builder
    (OPT, for one) fail it. Prompt-learning adapters are refused outright: their virtual tokens would
    come before the first sequence only."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ConfigError("train.packing does not work with prompt-learning methods (prompt/prefix/P-tuning)")
    device = next(model.parameters()).device
    first, second = [3, 4, 5, 6], [7, 8, 9]
    ids = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, len(first) :] = True
    was_training = model.training
    model.eval()
    try:
        packed = packed_forward(model, ids, positions, keep).logits.float()  # [len(second), vocab]
        alone = model(input_ids=ids[:, len(first) :], use_cache=False).logits[0].float()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"train.packing: {type(model).__name__} cannot run packed rows ({err})") from err
    finally:
        model.train(was_training)
    if packed.shape != alone.shape or not torch.allclose(packed, alone, rtol=1e-2, atol=1e-2):
        raise ConfigError(
            f"train.packing: {type(model).__name__} lets packed sequences attend to each other (its attention mask "
            "ignores position_ids restarts); set train.packing: false"
        )
