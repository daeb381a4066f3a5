"""The damaged-store corpus (store/cases.yaml): every case ends its `adapterkit store` command with exit
status 2 and one `error:` line naming the file, name or reference and what would be valid, without a
traceback; the store is left byte-identical; `list` still lists the good name (and reports the damaged
one); verify and load refuse what they must; and the good adapter still resolves, verifies, publishes,
and loads onto a model."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from adapters.errors import StoreError
from adapters.store.loading import load_adapter
from adapters.store.store import AdapterStore
from tests.bad_inputs.cli_cases import assert_refused, load_cases
from tests.bad_inputs.store_cases import (
    assert_still_works,
    build_store,
    copy_store,
    run_store_cli,
    run_store_subprocess,
    snapshot,
)

KIND = Path(__file__).parent / "store"
CASES = load_cases(KIND)


_TEMPLATE: list[Path] = []


@pytest.fixture()
def template(tmp_path_factory, make_adapter_folder) -> Path:
    """good@1, good@2, bad@1 (prod), bad@2: built once per module, copied per case."""
    if not _TEMPLATE:
        _TEMPLATE.append(build_store(tmp_path_factory.mktemp("template") / "store", make_adapter_folder).root)
    return _TEMPLATE[0]


def apply_damage(root: Path, damage: list[dict]) -> None:
    """Make a case's edits (cases.yaml's `damage` key) to the store at root."""
    for step in damage:
        if "write" in step:
            path = root / step["write"]
            if "text" in step:
                data = step["text"].encode("utf-8")
            elif "hex" in step:
                data = bytes.fromhex(step["hex"])
            else:
                data = (step["repeat"] * step["times"]).encode("utf-8")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        elif "edit" in step:
            path = root / step["edit"]
            manifest = json.loads(path.read_text(encoding="utf-8"))
            for dotted, value in step["set"].items():
                *parents, last = dotted.split(".")
                target = manifest
                for key in parents:
                    target = target[key]
                target[last] = value
            mode = path.stat().st_mode
            os.chmod(path, 0o644)  # published files are read-only; the damage is someone who edits anyway
            path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            os.chmod(path, mode)
        elif "remove" in step:
            path = root / step["remove"]
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        elif "mkdir" in step:
            (root / step["mkdir"]).mkdir(parents=True)
        elif "symlink" in step:
            (root / step["symlink"]).symlink_to(step["to"])
        else:
            raise AssertionError(f"unknown damage step {step}")


def _argv(case: dict, root: Path, src: Path, tmp: Path) -> list[str]:
    return ["--store", str(root), *(a.replace("{src}", str(src)).replace("{tmp}", str(tmp)) for a in case["argv"])]


def test_the_corpus_is_large_enough_and_covers_the_issue():
    ids = {case["id"] for case in CASES}
    assert len(CASES) >= 30
    assert {"tags-file-is-a-number", "tags-null", "tags-list", "tags-truncated"} <= ids
    assert {"manifest-fingerprint-edited", "publish-name-trailing-newline", "tag-trailing-newline"} <= ids


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_store_input_is_refused_with_one_line(case, template, tmp_path, make_adapter_folder, capsys, monkeypatch):
    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    store = copy_store(template, tmp_path / "store")
    apply_damage(store.root, case.get("damage", []))
    src = make_adapter_folder()
    argv = _argv(case, store.root, src, tmp_path)
    before = snapshot(store.root)

    assert_refused(run_store_cli(argv, capsys), case["expect"], case["id"])
    if case.get("subprocess"):
        assert_refused(run_store_subprocess(argv, tmp_path), case["expect"], case["id"])
    if "verify" in case:
        outcome = run_store_cli(["--store", str(store.root), "verify"], capsys)
        assert outcome.status == 1 and "Traceback" not in outcome.stdout + outcome.stderr
        assert any(line.startswith("FAILED") for line in outcome.stdout.splitlines())
        assert "ok      good@1" in outcome.stdout and "ok      good@2" in outcome.stdout
        assert re.search(case["verify"], outcome.stdout), (case["verify"], outcome.stdout)
    if "load" in case:
        with pytest.raises(StoreError, match=case["expect"]["message"]):
            load_adapter(object(), case["load"], store=AdapterStore(store.root))
    assert snapshot(store.root) == before, "a refused command changed the store"
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir()), "a refused export wrote its destination"
    assert_still_works(store, capsys, make_adapter_folder, damaged=case.get("damaged"))


def test_a_good_adapter_loads_onto_its_model_with_every_damage_at_once(tiny_llama_dir, tmp_path, make_adapter_folder):
    """Every case's damage in one store (the ones that can live together), then good loads onto the tiny
    Llama through load_adapter with its base checked, and its LoRA weights are the published ones."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file, save_file

    from adapters.store.fingerprint import fingerprint_model
    from adapters.store.manifest import read_manifest, write_manifest

    store = AdapterStore(tmp_path / "store")
    src = make_adapter_folder(base_fingerprint=fingerprint_model(tiny_llama_dir))
    rng = np.random.default_rng(7)  # LoRA on q_proj of both layers of the tiny Llama (width 32), rank 2
    weights = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": rng.standard_normal(shape, "float32")
        for i in (0, 1)
        for ab, shape in (("A", (2, 32)), ("B", (32, 2)))
    }
    save_file(weights, str(src / "adapter_model.safetensors"))
    write_manifest(src, read_manifest(src))
    store.publish(src, "good")
    store.publish(make_adapter_folder(), "bad", tags=("latest", "prod"))
    store.publish(make_adapter_folder(), "bad")
    seen: set[str] = set()
    for case in CASES:
        damage = case.get("damage", [])
        paths = {
            next(v for k, v in step.items() if k in ("write", "edit", "mkdir", "symlink", "remove")) for step in damage
        }
        if damage and not paths & seen:
            apply_damage(store.root, damage)
            seen |= paths
    assert len(seen) >= 10, seen
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = load_adapter(model, "good", store=store)
    published = load_file(str(src / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    assert len(published) == 4
    for key, value in published.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), torch.from_numpy(value)), name
