"""Training start-up (issue 19): the run folder appears only once the config and data passed their checks,
and is removed when the start fails after creating it; a DeepSpeed resume (DeepSpeed's loader unpickles)
needs the user's explicit trust."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from adapters.errors import ConfigError
from adapters.training.checkpoint import CheckpointError, check_resume_trust, load_checkpoint
from tests.training.test_training import tiny_cfg


def test_resume_trust_is_needed_only_under_deepspeed(monkeypatch):
    with pytest.raises(CheckpointError, match=r"unpickles it .*--trust-checkpoint"):
        check_resume_trust(False, deepspeed=True)
    check_resume_trust(True, deepspeed=True)
    check_resume_trust(False, deepspeed=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for DeepSpeed
    with pytest.raises(CheckpointError, match="trust"):
        check_resume_trust(False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    check_resume_trust(False)


class _DeepSpeedAccelerator:
    """Just what load_checkpoint asks of a DeepSpeed accelerator; records whether DeepSpeed's loader ran."""

    distributed_type = SimpleNamespace(value="DEEPSPEED")
    process_index = 0

    def __init__(self):
        self.loaded = []

    def load_state(self, folder, **kwargs):
        self.loaded.append(folder)


def test_an_untrusted_deepspeed_checkpoint_is_never_handed_to_deepspeeds_loader(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0}))
    accelerator = _DeepSpeedAccelerator()
    with pytest.raises(CheckpointError, match="DeepSpeed's loader, which unpickles"):
        load_checkpoint(tmp_path, accelerator, None, None, None)
    assert accelerator.loaded == []
    loaded = load_checkpoint(tmp_path, accelerator, None, None, None, trust_pickle=True)
    assert accelerator.loaded == [str(tmp_path)] and loaded.state["step"] == 3


def test_a_start_that_fails_after_creating_the_run_folder_removes_it(tiny_llama_dir, tmp_path, one_torch_thread):
    from adapters.training.setup import setup_run

    def refuse(model):
        raise ConfigError("warm start: refused")

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    seen = []
    with pytest.raises(ConfigError, match="refused"):
        setup_run(
            cfg, on_model_ready=lambda model: (seen.append((tmp_path / "run" / "config.yaml").is_file()), refuse(model))
        )
    assert seen == [True], "the folder existed while the model was being set up"
    assert not (tmp_path / "run").exists()


def test_a_failed_start_keeps_a_run_folder_that_was_already_there(tiny_llama_dir, tmp_path, one_torch_thread):
    from adapters.training.setup import setup_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    cfg = tiny_cfg(tiny_llama_dir, run_dir)

    def refuse(model):
        raise ConfigError("refused")

    with pytest.raises(ConfigError):
        setup_run(cfg, on_model_ready=refuse)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_a_data_error_creates_no_run_folder(tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "Where is Paris?", "label": "place"}\n{"text": "Who was Ada?", "label": \n')
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run", data__name=str(data))
    with pytest.raises(ConfigError, match=r"rows\.jsonl: line 2 is not valid JSON"):
        train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
