"""The official `openai` client against the server on loopback: completions and chat, logprobs equal to a
teacher-forced forward pass of the same base + adapter (peft), echo, token-id prompts, n, content parts,
roles, nulls, and a 400 naming every parameter the server does not implement."""

from __future__ import annotations

import openai
import pytest
import torch

from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, InferenceEngine
from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.settings import ServerSettings
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

ATOL = 1e-4  # the engine's batched LoRA matmuls against peft's own forward, both float32


@pytest.fixture(scope="module")
def alpha_src(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("openai-src") / "alpha", seed=41)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, alpha_src, tmp_path_factory, one_torch_thread):
    store = AdapterStore(tmp_path_factory.mktemp("openai-store"))
    store.publish(alpha_src, "alpha", tags=("prod",))
    return InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)


@pytest.fixture(scope="module")
def client(engine):
    settings = ServerSettings(max_tokens=32, max_prompt_tokens=128, batch_window_ms=2)
    with BackgroundServer(create_app(engine, settings)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def peft_model(tiny_llama_dir, alpha_src):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(alpha_src)).eval()


def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax [len(ids), vocab] of one forward pass over ids; row j predicts ids[j + 1]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def generate(engine, **request):
    params = request.pop("params", SamplingParams(max_new_tokens=5))
    return engine.generate([GenerationRequest(adapter="alpha", params=params, **request)])[0]


def test_completion_logprobs_equal_a_teacher_forced_forward(client, engine, peft_model):
    expected = generate(engine, prompt="The weather today")
    out = client.completions.create(
        model="alpha", prompt="The weather today", max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    choice = out.choices[0]
    ids = expected.prompt_ids + expected.token_ids
    assert choice.text.endswith(expected.text) and len(choice.logprobs.tokens) == len(ids)
    assert "".join(choice.logprobs.tokens) == choice.text  # texts join up, offsets index the text
    assert choice.logprobs.text_offset == [len("".join(choice.logprobs.tokens[:i])) for i in range(len(ids))]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    reference = teacher_forced(peft_model, ids)
    for j in range(1, len(ids)):
        assert choice.logprobs.token_logprobs[j] == pytest.approx(float(reference[j - 1, ids[j]]), abs=ATOL)
        top = list(choice.logprobs.top_logprobs[j].values())
        assert top == pytest.approx(torch.topk(reference[j - 1], 3).values.tolist(), abs=ATOL)
    for j in range(len(expected.prompt_ids), len(ids)):  # greedy: each generated token is the best one
        assert choice.logprobs.token_logprobs[j] == max(choice.logprobs.top_logprobs[j].values())
    assert out.usage.prompt_tokens == len(expected.prompt_ids) and out.usage.completion_tokens == 5


def test_echo_scores_token_id_prompts_without_generating(client, engine, peft_model):
    prompts = [[504, 3165, 1980, 314], [19556, 28]]  # token ids: used as given
    out = client.completions.create(model="alpha", prompt=prompts, max_tokens=0, logprobs=1, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    for ids, choice in zip(prompts, out.choices):
        assert choice.text == engine.tokenizer.decode(ids) and choice.finish_reason == "length"
        reference = teacher_forced(peft_model, ids)
        expected = [None] + [pytest.approx(float(reference[j - 1, ids[j]]), abs=ATOL) for j in range(1, len(ids))]
        assert choice.logprobs.token_logprobs == expected
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 0
    one = client.completions.create(model="alpha", prompt=prompts[0], max_tokens=3, temperature=0)
    assert one.choices[0].text == generate(engine, prompt_ids=prompts[0], params=SamplingParams(max_new_tokens=3)).text


def test_chat_logprobs_content_parts_and_developer_role(client, engine, peft_model):
    out = client.chat.completions.create(
        model="alpha",
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]},
        ],
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nhi"}]
    expected = generate(engine, messages=messages, params=SamplingParams(max_new_tokens=4))
    choice = out.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    ids = expected.prompt_ids + expected.token_ids
    reference = teacher_forced(peft_model, ids)
    content = choice.logprobs.content
    assert len(content) == len(expected.token_ids) and "".join(t.token for t in content) == expected.text
    for k, token in enumerate(content):
        j = len(expected.prompt_ids) + k
        assert token.logprob == pytest.approx(float(reference[j - 1, ids[j]]), abs=ATOL)
        assert token.bytes == list(token.token.encode("utf-8")) and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob == token.logprob  # greedy: the best token was chosen


def test_tool_messages_go_to_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    out = client.chat.completions.create(model="alpha", messages=messages, max_tokens=3, temperature=0)
    expected = generate(engine, messages=messages, params=SamplingParams(max_new_tokens=3))
    assert out.choices[0].message.content == expected.text


def test_n_samples_are_the_seeded_rows_seed_plus_i(client):
    def sample(**kw):
        return client.completions.create(model="alpha", prompt="Once", max_tokens=6, temperature=1.0, **kw)

    two = sample(n=2, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [sample(seed=5).choices[0].text, sample(seed=6).choices[0].text]
    assert two.choices[0].text != two.choices[1].text
    assert two.usage.completion_tokens == 12 and two.usage.prompt_tokens == sample(seed=5).usage.prompt_tokens
    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], n=2, seed=2**64 - 1, max_tokens=4
    )
    again = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], seed=0, max_tokens=4
    )
    assert chat.choices[1].message.content == again.choices[0].message.content  # (2**64 - 1 + 1) mod 2**64


@pytest.mark.parametrize(
    ("endpoint", "extra", "named"),
    [
        ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("completions", {"frequency_penalty": 1.0}, "frequency_penalty"),
        ("completions", {"logit_bias": {"42": 5}}, "logit_bias"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("completions", {"extra_body": {"top_k": 5}}, "top_k"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ("chat", {"tool_choice": "auto"}, "tool_choice"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"extra_body": {"repetition_penalty": 1.1}}, "repetition_penalty"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "image_url",
        ),
    ],
)
def test_a_parameter_the_server_does_not_implement_is_a_400_naming_it(client, endpoint, extra, named):
    if endpoint == "completions":
        call = lambda: client.completions.create(model="alpha", prompt="x", max_tokens=1, **extra)  # noqa: E731
    else:
        body = {"messages": [{"role": "user", "content": "x"}], **extra}
        call = lambda: client.chat.completions.create(model="alpha", max_tokens=1, **body)  # noqa: E731
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert named in err.value.message


def test_nulls_mean_defaults_and_edge_values_are_answered(client, engine):
    nulls = client.completions.create(
        model="alpha",
        prompt="Once",
        max_tokens=None,
        temperature=None,
        top_p=None,
        n=None,
        echo=None,
        seed=3,
        logprobs=None,
        presence_penalty=None,
        frequency_penalty=None,
        logit_bias=None,
        suffix=None,
        best_of=None,
    )
    explicit = client.completions.create(model="alpha", prompt="Once", max_tokens=16, temperature=1.0, seed=3)
    assert nulls.choices[0].text == explicit.choices[0].text and nulls.usage.completion_tokens == 16
    greedy = generate(engine, prompt="Once", params=SamplingParams(max_new_tokens=4)).text
    tiny = client.completions.create(model="alpha", prompt="Once", max_tokens=4, temperature=1e-45, seed=1)
    assert tiny.choices[0].text == greedy
    nucleus = client.completions.create(model="alpha", prompt="Once", max_tokens=4, top_p=5e-324, seed=1)
    assert nucleus.choices[0].text == greedy  # the top token is always kept
    for seed in (2**64 - 1, -(2**63), -1):
        assert client.completions.create(model="alpha", prompt="x", max_tokens=1, seed=seed).choices
    with pytest.raises(openai.BadRequestError, match="seed: Input should be less than 18446744073709551616"):
        client.completions.create(model="alpha", prompt="x", max_tokens=1, seed=2**64)
    with pytest.raises(openai.BadRequestError, match="prompt: token id"):
        client.completions.create(model="alpha", prompt=[len(engine.tokenizer)], max_tokens=1)


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["base", "alpha@1"]
    assert all(isinstance(m.created, int) and m.created > 1_600_000_000 and m.owned_by for m in models)
    assert client.models.retrieve("alpha@1").id == "alpha@1"
    assert client.models.retrieve("alpha@prod").created == models[1].created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ghost")
