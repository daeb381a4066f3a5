"""Preference and RL objectives (train.objective): each loss equals TRL's own code on the same
log-probs, and DPO / KTO / ORPO / SimPO / GRPO train adapters through the ordinary loop (LoRA, QLoRA)."""

from __future__ import annotations

import collections
import json
import math
from types import SimpleNamespace

import pytest
import torch

from adapters.config import load_config
from adapters.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- TRL's code, called on fixed log-probs
class _FixedLogps(torch.nn.Module):
    """Stands in for a model under TRL's fused LM head: returns the given per-token log-probs [rows, seq - 1]
    (zero where the labels are -100), as ``model(..., labels=..., fused_lm_head=True).log_probs`` does."""

    is_gradient_checkpointing = False

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = logps

    def forward(self, input_ids=None, labels=None, **_):
        rows = input_ids.shape[0]
        logps = self.logps[:rows] if rows == self.logps.shape[0] else self.logps[-rows:]
        logps = logps * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer_stub(**attrs) -> SimpleNamespace:
    from accelerate import Accelerator

    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    return SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _pair_batch(pairs=3, length=9, seed=0):
    """[2 * pairs, length] rows with completions of different lengths; per-token log-probs of policy and reference."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        completion_mask[row, 3 + row % 4 :] = 1
    policy = -torch.rand(2 * pairs, length - 1, generator=gen) * 3
    reference = -torch.rand(2 * pairs, length - 1, generator=gen) * 3
    inputs = {
        "input_ids": torch.randint(0, 50, (2 * pairs, length), generator=gen),
        "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    mask = completion_mask[:, 1:].bool()
    return inputs, policy * mask, reference * mask, mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_equals_trls_on_a_fixed_batch(loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer

    from adapters.training.objectives.pairwise import dpo_loss

    inputs, policy, reference, mask = _pair_batch()
    stub = _trainer_stub(
        model=_FixedLogps(policy),
        ref_model=_FixedLogps(reference),
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=0.1,
        use_weighting=False,
        label_smoothing=0.0,
    )
    trl_loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    sums, ref_sums, tokens = policy.sum(1), reference.sum(1), inputs["completion_mask"].sum(1).float()
    ours = dpo_loss(sums[:3], sums[3:], ref_sums[:3], ref_sums[3:], 0.1, loss_type, tokens[:3], tokens[3:]).mean()
    torch.testing.assert_close(ours, trl_loss)


def test_kto_loss_equals_trls_on_a_fixed_batch():
    from trl.trainer.kto_trainer import KTOTrainer

    from adapters.training.objectives.kto import kto_losses

    inputs, policy, reference, _ = _pair_batch(pairs=2, seed=1)
    kl_inputs, kl_policy, kl_reference, _ = _pair_batch(pairs=2, seed=2)
    inputs.update(
        {
            "KL_input_ids": kl_inputs["input_ids"],
            "KL_attention_mask": kl_inputs["attention_mask"],
            "KL_completion_mask": kl_inputs["completion_mask"],
            "label": torch.tensor([1, 1, 0, 0]),
        }
    )
    policy_model = _FixedLogps(torch.cat([kl_policy, policy]))  # TRL asks for the KL rows first
    stub = _trainer_stub(
        model=policy_model,
        ref_model=_FixedLogps(torch.cat([kl_reference, reference])),
        calculate_KL=True,
        loss_type="kto",
        beta=0.1,
        desirable_weight=1.3,
        undesirable_weight=0.7,
    )
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    # The KL rows and the completion rows have the same shape: tell the fake model which ones it sees.
    calls = iter([kl_policy, policy, kl_reference, reference])
    stub.model.forward = stub.ref_model.forward = lambda input_ids=None, labels=None, **_: SimpleNamespace(
        log_probs=next(calls) * (labels[:, 1:] != -100),
        entropy=torch.zeros_like(policy),
        mean_logits=torch.zeros_like(policy),
        is_top1=torch.zeros_like(policy).bool(),
    )
    trl_loss = KTOTrainer._compute_loss(stub, stub.model, inputs, False)
    kl = (kl_policy.sum(1) - kl_reference.sum(1)).mean().clamp(min=0)
    ratios = policy.sum(1) - reference.sum(1)
    ours = kto_losses(ratios[:2], ratios[2:], kl, 0.1, 1.3, 0.7).mean()
    torch.testing.assert_close(ours, trl_loss)


def test_orpo_and_simpo_losses_equal_trls_functions():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from adapters.training.objectives.pairwise import orpo_loss, simpo_loss

    chosen = -torch.rand(5, generator=torch.Generator().manual_seed(3)) * 2 - 0.05
    rejected = -torch.rand(5, generator=torch.Generator().manual_seed(4)) * 2 - 0.05
    device = SimpleNamespace(device="cpu")
    orpo = SimpleNamespace(beta=0.25, accelerator=device)
    odds_term = ORPOTrainer.odds_ratio_loss(orpo, chosen, rejected)[0]  # beta * log sigma(log odds)
    torch.testing.assert_close(orpo_loss(chosen, rejected, 0.25), -chosen - odds_term)
    simpo = SimpleNamespace(
        beta=2.0, simpo_gamma=0.7, alpha=0.0, loss_type="simpo", label_smoothing=0.0, accelerator=device
    )
    torch.testing.assert_close(simpo_loss(chosen, rejected, 2.0, 0.7), CPOTrainer.cpo_loss(simpo, chosen, rejected)[0])


def test_grpo_advantages_and_loss_equal_trls():
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import nanstd

    from adapters.training.objectives.grpo import group_advantages, grpo_sequence_losses

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 0.5, 0.0])
    # TRL's _generate_and_score_completions, scale_rewards "group", transcribed with its own nanstd.
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    advantages = group_advantages(rewards, 4)
    torch.testing.assert_close(advantages, expected)

    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(12, 6)
    mask[::3, 4:] = 0
    logps = (-torch.rand(12, 6, generator=gen) * 2).requires_grad_()
    ref = -torch.rand(12, 6, generator=gen) * 2
    for beta in (0.0, 0.04):
        stub = _trainer_stub(
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            importance_sampling_level="token",
            beta=beta,
            loss_type="grpo",
            epsilon_low=0.2,
            epsilon_high=0.2,
            use_vllm=False,
            model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1,
            _entropy_bonus_enabled=False,
        )
        stub.args.delta, stub.args.use_bias_correction_kl = None, False
        stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(ref), None)
        inputs = {
            "prompt_ids": torch.zeros(12, 2, dtype=torch.long),
            "prompt_mask": torch.ones(12, 2),
            "completion_ids": torch.zeros(12, 6, dtype=torch.long),
            "completion_mask": mask,
            "advantages": advantages,
            "ref_per_token_logps": ref,
        }
        trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
        (trl_grad,) = torch.autograd.grad(trl_loss, logps)
        ours = grpo_sequence_losses(logps, mask.bool(), advantages, ref, beta).mean()
        (our_grad,) = torch.autograd.grad(ours, logps)
        torch.testing.assert_close(ours, trl_loss)
        torch.testing.assert_close(our_grad, trl_grad)


# ---------------------------------------------------------------- pieces
def test_completion_logps_match_a_plain_forward_whatever_the_padding(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from adapters.data.pairs import rows_batch
    from adapters.modeling.logprobs import completion_logps

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    rows = [[1, 5, 9, 13, 2], [1, 7, 2], [1, 4, 4, 4, 4, 8, 2]]
    labels = [[-100, -100, 9, 13, 2], [-100, 7, 2], [-100] * 4 + [4, 8, 2]]
    expected = []
    with torch.no_grad():
        for ids, lab in zip(rows, labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(ids[1:])
            expected.append(float((logits.gather(-1, targets[:, None])[:, 0] * (torch.tensor(lab[1:]) != -100)).sum()))
        for side in ("left", "right"):
            batch = rows_batch(rows, labels, 0, side)
            logps, mask = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            torch.testing.assert_close(logps.sum(1), torch.tensor(expected), atol=1e-5, rtol=1e-5)
            assert mask.sum(1).tolist() == [3, 2, 3]


def _tiny_lora(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def test_grpo_shared_prompt_logps_equal_full_rows_with_gradients(tiny_llama_dir):
    """Each prompt run once with its cache repeated for its group gives completion_logps' values and gradients."""
    from adapters.data.pairs import rows_batch
    from adapters.modeling.logprobs import completion_logps
    from adapters.training.objectives.grpo import shared_prompt_logps

    model = _tiny_lora(tiny_llama_dir).train()
    prompts = [[1, 5, 9, 13, 7], [1, 7], [1, 4, 4, 4]]
    completions = [[8, 2], [3, 3, 9], [2], [11, 12, 13], [5, 6], [2]]  # 2 per prompt, lengths 1 to 3
    repeated = [p for p in prompts for _ in range(2)]
    batch = rows_batch(
        [p + c for p, c in zip(repeated, completions)],
        [[-100] * len(p) + c for p, c in zip(repeated, completions)],
        0,
        "left",
    )
    expected, expected_mask = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 0.7)
    weights = [p for p in model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected.sum(), weights)
    logps, mask = shared_prompt_logps(model, prompts, completions, 2, 0, 0.7)
    grads = torch.autograd.grad(logps.sum(), weights)
    assert mask.sum(1).tolist() == expected_mask.sum(1).tolist() == [2, 3, 1, 3, 2, 1]
    # completion_logps aligns the completions at the right end, shared_prompt_logps at the left
    for row, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(logps[row, :n], expected[row, expected.shape[1] - n :], atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_grpo_cached_sampling_follows_generate(tiny_llama_dir):
    """At a temperature near 0 the cached sampler picks what greedy generate picks, cut after the end token."""
    from transformers import AutoTokenizer

    from adapters.config import GRPOConfig
    from adapters.data.pairs import pad_rows
    from adapters.training.objectives.grpo import GRPOObjective

    model = _tiny_lora(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    prompts = [[1, 5, 9, 13, 7], [1, 7]]
    objective = GRPOObjective(GRPOConfig(num_generations=3, max_new_tokens=5, temperature=1e-4), tok, [])
    sampled = objective.sample(model, prompts)
    repeated = [p for p in prompts for _ in range(3)]
    out = model.generate(
        input_ids=pad_rows(repeated, 0, "left"),
        attention_mask=pad_rows([[1] * len(p) for p in repeated], 0, "left"),
        do_sample=False,
        max_new_tokens=5,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    greedy = [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in out[:, 5:].tolist()]
    assert sampled == greedy
    assert model.training  # sampling leaves the mode as it was


def test_trec_preference_pairs_are_constructed_from_trec_and_stable():
    from adapters.data.builtins import BUILTIN_DATASETS, TREC_WORDS

    rows = BUILTIN_DATASETS["trec-preference"].load()
    assert set(rows.column_names) >= {"prompt", "chosen", "rejected", "label"}
    sample = rows.select(range(0, len(rows), 97))
    for row in sample:
        assert row["chosen"] == TREC_WORDS[row["label"]] and row["rejected"] in TREC_WORDS.values()
        assert row["rejected"] != row["chosen"]
    again = BUILTIN_DATASETS["trec-preference"].load()
    assert again["rejected"][:500] == rows["rejected"][:500]
    first = {}
    for text, rejected in zip(rows["prompt"], rows["rejected"]):  # a question repeated across releases
        assert first.setdefault(text, rejected) == rejected


def test_preference_rows_share_the_prompt_and_batch_chosen_then_rejected(tiny_llama_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from adapters.config import DataConfig
    from adapters.data.pairs import pair_collator, preference_encoder

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = DataConfig(name="x", text_field="prompt", response_field="chosen", max_length=40)
    rows = Dataset.from_dict(
        {
            "prompt": ["Where is Paris ?", "Who wrote Hamlet ?"],
            "chosen": ["location", "human"],
            "rejected": ["number", "entity"],
        }
    )
    encoded = rows.map(preference_encoder(tok, data, 4, {}), batched=True, remove_columns=rows.column_names)
    for row in encoded:
        start = row["labels"].index(next(x for x in row["labels"] if x != -100))
        assert row["input_ids"][:start] == row["rejected_input_ids"][:start] == row["prompt_ids"]
        assert tok.decode(row["rejected_input_ids"][start:], skip_special_tokens=True) in ("number", "entity")
    batch = pair_collator(tok, kto=True)([encoded[0], encoded[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["kl_input_ids"].shape[0] == 4
    decoded = [tok.decode([t for t in row if t != -100], skip_special_tokens=True) for row in batch["labels"].tolist()]
    assert decoded == ["location", "human", "number", "entity"]
    kl = [tok.decode([t for t in row if t != -100], skip_special_tokens=True) for row in batch["kl_labels"].tolist()]
    assert kl == ["entity", "location", "human", "number"]  # row i: prompt i, completion of row i - 1


def test_objective_config_errors_name_the_choices():
    raw = {"task": "causal-lm", "model": {"name": "x"}, "data": {"name": "trec"}}
    with pytest.raises(ConfigError, match=r"train\.objective.*'sft', 'dpo', 'orpo', 'kto', 'simpo' or 'grpo'"):
        load_config(raw=raw, overrides=["train.objective=ppo"])
    with pytest.raises(ConfigError, match=r"unknown reward 'bleu'; valid: exact_match, regex, length_penalty"):
        load_config(raw=raw, overrides=["train.objective=grpo", "train.grpo.rewards=[{name: bleu}]"])
    with pytest.raises(ConfigError, match=r"'pattern' goes with name 'regex'"):
        load_config(raw=raw, overrides=["train.grpo.rewards=[{name: regex}]"])
    with pytest.raises(ConfigError, match=r"task 'sequence-classification' takes only 'sft'"):
        load_config(raw={**raw, "task": "sequence-classification"}, overrides=["train.objective=dpo"])


def test_rewards_by_name_and_by_callable():
    from adapters.config import RewardConfig
    from adapters.training.objectives.rewards import load_reward, score_completions

    specs = [
        RewardConfig(name="exact_match"),
        RewardConfig(name="regex", pattern=r"^\w+$"),
        RewardConfig(name="length_penalty"),
        RewardConfig(name="tests.training.test_objectives:_shouting"),
    ]
    functions = [load_reward(s, max_new_tokens=4) for s in specs]
    scores = score_completions(
        functions,
        [s.name for s in specs],
        ["q1", "q2"],
        ["Location.\nmore", "a number"],
        [[5, 6, 2], [7]],
        ["location", "number"],
    )
    assert scores.tolist() == [[1.0, 0.0, -0.75, 1.0], [0.0, 0.0, -0.25, 0.0]]
    with pytest.raises(ConfigError, match="cannot import 'no_such_module:f'"):
        load_reward(RewardConfig(name="no_such_module:f"), 4)


def test_exact_match_reward_scores_as_the_evaluation_metric():
    """What GRPO rewards is what the test metric counts: the metric's exact_match over the first lines
    the evaluator keeps (generate_scored_answers) equals the mean reward, and so does each single answer."""
    from adapters.evaluation.evaluator import first_line_answer
    from adapters.evaluation.metrics import exact_match
    from adapters.training.objectives.rewards import exact_match_reward

    completions = [
        "Human",
        " human.",
        "HUMAN!\nbecause",
        "Human is",
        '"Location"',
        "location:",
        "num ber",
        "",
        "Entity",
    ]
    targets = ["human", "human", "human", "human", "location", "location", "number", "number", "entity "]
    rewards = exact_match_reward(completions=completions, target=targets)
    answers = [first_line_answer(c) for c in completions]
    assert rewards == [exact_match([a], [t]) for a, t in zip(answers, targets)]
    assert sum(rewards) / len(rewards) == exact_match(answers, targets)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def _shouting(prompts, completions, **_):
    """A user reward in TRL's convention: 1.0 for a completion that starts with a capital letter."""
    return [float(c[:1].isupper()) for c in completions]


# ---------------------------------------------------------------- training runs
def pref_cfg(model_dir, run_dir, objective="dpo", **overrides):
    raw = {
        "task": "causal-lm",
        "model": {"name": str(model_dir)},
        "data": {
            "name": "trec-preference",
            "max_length": 48,
            "max_train_samples": 48,
            "max_eval_samples": 16,
            "max_test_samples": 16,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "objective": objective,
            "lr": 2e-2,
            "batch_size": 8,
            "max_steps": 10,
            "log_every": 2,
            "seed": 1,
            "eval_batch_size": 16,
            "scheduler": "constant",
        },
        "eval": {"max_new_tokens": 3, "baseline": False},
        "output": {"run_dir": str(run_dir), "name": f"tiny-{objective}"},
    }
    for key, value in overrides.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return load_config(raw=raw)


def _events(run_dir, event):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == event]


def _train_pair_accuracy(cfg, adapter_dir=None):
    """Preference accuracy on the run's training pairs: of the base, or of the base + the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data.loading import prepare_splits, tokenize_splits
    from adapters.evaluation.preference import evaluate_preference

    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    tokenized = tokenize_splits(prepare_splits(cfg), cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return evaluate_preference(model, tokenized["train"], tok, SimpleNamespace(device="cpu"), 16)


def test_dpo_trains_a_lora_and_training_pairs_rank_better(tiny_llama_dir, tmp_path, store_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data.prompts import PromptFormat, build_prompt_ids
    from adapters.modeling.generation import SamplingParams
    from adapters.serving.engine import GenerationRequest, InferenceEngine
    from adapters.store.store import AdapterStore
    from adapters.training.loop import train

    cfg = pref_cfg(
        tiny_llama_dir,
        tmp_path / "run",
        output__publish=True,
        output__store=str(store_root),
        train__lr=5e-2,
        train__preference={"beta": 0.5},
    )
    before = _train_pair_accuracy(cfg)
    result = train(cfg)
    after = _train_pair_accuracy(cfg, result.adapter_dir)
    assert after["preference_accuracy"] > before["preference_accuracy"] + 0.2, (before, after)
    assert after["logp_margin"] > before["logp_margin"]
    steps = _events(result.run_dir, "objective")
    assert len(steps) == 10 and {"train_preference_accuracy", "train_logp_margin"} <= set(steps[0])
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["objective"] == {
        "name": "dpo",
        "beta": 0.5,
        "reference": "base with adapter disabled",
        "loss_type": "sigmoid",
    }
    assert {"preference_accuracy", "logp_margin", "exact_match"} <= set(manifest["metrics"]["test"])
    assert manifest["training"]["train"]["objective"] == "dpo"
    store = AdapterStore(store_root)
    assert store.versions("tiny-dpo") == [1] and store.verify("tiny-dpo@1") == {"tiny-dpo@1": []}
    # The server takes it like any adapter, and answers what the trained model answers greedily.
    engine = InferenceEngine(str(tiny_llama_dir), store=store)
    served = engine.generate(
        [GenerationRequest(adapter="tiny-dpo@1", prompt="Where is Paris ?", params=SamplingParams(max_new_tokens=3))]
    )[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(result.adapter_dir)
    ).eval()
    prompt = build_prompt_ids(tok, "Where is Paris ?", PromptFormat.from_data_config(cfg.data))
    greedy = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
    assert served.token_ids == greedy[0, len(prompt) :].tolist()[: len(served.token_ids)]


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_reference_free_and_unpaired_objectives_train(objective, tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    cfg = pref_cfg(tiny_llama_dir, tmp_path / objective, objective, train__max_steps=6)
    before = _train_pair_accuracy(cfg)
    result = train(cfg)
    after = _train_pair_accuracy(cfg, result.adapter_dir)
    assert after["logp_margin"] > before["logp_margin"], (before, after)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["objective"]["name"] == objective
    expected_reference = "base with adapter disabled" if objective == "kto" else None
    assert manifest["objective"]["reference"] == expected_reference


def test_qlora_dpo_runs_on_a_4bit_base(tiny_llama64_dir, tmp_path):
    from adapters.training.loop import train

    cfg = pref_cfg(tiny_llama64_dir, tmp_path / "qlora", model__quantization={"bits": 4}, train__max_steps=4)
    result = train(cfg)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["base_model"]["quantization"]["bits"] == 4 and manifest["objective"]["name"] == "dpo"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_grpo_runs_with_an_exact_match_reward_and_records_it(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from adapters.training.loop import train

    rewards = [{"name": "exact_match"}, {"name": "regex", "pattern": "e"}, {"name": "length_penalty", "weight": 0.1}]
    cfg = pref_cfg(
        tiny_llama_dir,
        tmp_path / "grpo",
        "grpo",
        data__name="trec",
        train__max_steps=3,
        train__batch_size=4,
        train__grpo={"num_generations": 3, "max_new_tokens": 3, "beta": 0.05, "rewards": rewards},
    )
    result = train(cfg)
    steps = _events(result.run_dir, "objective")
    assert len(steps) == 3
    expected = {"reward", "reward_exact_match", "reward_regex", "reward_length_penalty", "completion_tokens"}
    assert expected <= set(steps[0])
    assert all(0 < s["completion_tokens"] <= 3 for s in steps)
    # The random tiny model never answers right, but the regex reward varies within groups: gradients flowed.
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    objective = manifest["objective"]
    assert objective["name"] == "grpo" and objective["reference"] == "base with adapter disabled"
    assert objective["rewards"] == [
        {"name": "exact_match", "weight": 1.0},
        {"name": "regex", "weight": 1.0, "pattern": "e"},
        {"name": "length_penalty", "weight": 0.1},
    ]
    assert "exact_match" in manifest["metrics"]["test"]


def test_objectives_that_need_a_reference_refuse_methods_without_one(tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    with pytest.raises(ConfigError, match=r"train.objective 'dpo' compares with the base with the adapter disabled"):
        train(pref_cfg(tiny_llama_dir, tmp_path / "full", method={"name": "full"}))


def test_preference_objectives_need_rejected_responses(tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    with pytest.raises(ConfigError, match=r"train.objective 'dpo' trains on preference rows.*rejected"):
        train(pref_cfg(tiny_llama_dir, tmp_path / "trec", data__name="trec"))
