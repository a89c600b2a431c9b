"""
Tests that every entry point refuses bad input before any work: one line on stderr naming the option, file and line,
or folder, the exit status (2 for options, 1 for files), no traceback, nothing created or changed. train.py,
evaluate.py, room.py; the cases are listed in docs/reliability.md.

    OMP_NUM_THREADS=1 python -m pytest -q test_inputs.py
"""
import json
import os
import subprocess
import sys

import pytest
from transformers import DistilBertConfig, LlamaConfig, LlamaForCausalLM

import base_model
import config
import room
import train
from test_reliability import QUICK, evaluate_cli, refused, run_folder, snapshot

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- bad input, refused before any work

@pytest.mark.parametrize("argv, message", [
    (["--m", "0"], "--m must be at least 1, not 0"),
    (["--K", "0"], "--K must be at least 1, not 0"),
    (["--alpha", "0"], "--alpha must be above 0"),
    (["--alpha", "nan"], "--alpha must be above 0, not nan"),
    (["--eta-lr", "-0.1"], "--eta-lr must be above 0"),
    (["--psi-lr", "0"], "--psi-lr must be above 0"),
    (["--lora-rank", "49"], "--lora-rank 49 is larger than the toy model's layers"),
    (["--meta-batch", "0"], "--meta-batch must be at least 1"),
    (["--max-skip-share", "1.5"], "--max-skip-share must be from 0 to 1"),
    (["--meta-grad", "both"], "--meta-grad must be one of unroll, replay"),
    (["--m", "eight"], "argument --m: invalid int value"),
    (["--preset", "huge"], "--preset must be one of"),
])
def test_bad_option_is_refused_in_one_line(argv, message, tmp_path, capsys):
    status, err = refused([*QUICK, "--out", str(tmp_path / "run"), *argv], capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


DATA_CASES = [   # (file content, what the one line says after the path); None: no such file
    (None, ": no such file"),
    (b"", ": empty file"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n', ":2: not UTF-8"),
    (b'{"question": "q", "answer": "#### 1"}\n\n{"question": \n', ":3: not JSON"),
    (b'{"problem": "p", "type": "Algebra"}\n', ":1: missing or non-string field(s) solution"),
]


@pytest.mark.parametrize("which", ["--data", "--eval-data"])
@pytest.mark.parametrize("content, message", DATA_CASES)
def test_bad_data_file_is_refused_in_one_line(which, content, message, tmp_path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"question": "How many?", "answer": "#### 3"}\n')
    if content is not None:
        bad.write_bytes(content)
    files = ["--data", str(bad)] if which == "--data" else ["--data", str(good), "--eval-data", str(bad)]
    status, err = refused([*QUICK, "--out", str(tmp_path / "run"), *files], capsys)
    assert status == 1 and f"{bad}{message}" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def model_folders(root):
    """A causal LM of width 32, a folder without config.json, a model that is not a causal LM, a .gguf file of text
    and one cut after its GGUF header's magic and version."""
    tok = base_model.build_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64))
    base_model.save(llama, tok, str(root / "llama"))
    (root / "empty").mkdir()
    DistilBertConfig().save_pretrained(str(root / "distilbert"))
    (root / "garbage.gguf").write_bytes(b"hello, not a model\n")
    (root / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")
    return root


GGUF_REFUSED = "not a readable GGUF file" if base_model.gguf_readable() else "reading a GGUF file needs"


@pytest.mark.parametrize("model, extra, message", [
    ("missing", [], "missing: no such folder"),
    ("empty", [], "empty: not a Hugging Face model folder (no config.json)"),
    ("distilbert", [], "model type 'distilbert' is not a causal LM"),
    ("llama", ["--lora-rank", "33"], "LoRA rank 33 is larger than layer model.layers.0.self_attn.q_proj"),
    ("llama", ["--lora-modules", "wq"], "no nn.Linear or Conv1D module named any of ['wq']"),
    ("missing.gguf", [], "missing.gguf: no such file"),
    ("garbage.gguf", [], "garbage.gguf: " + GGUF_REFUSED),
    ("truncated.gguf", [], "truncated.gguf: " + GGUF_REFUSED),
])
def test_bad_model_is_refused_in_one_line(model, extra, message, tmp_path, capsys):
    root = model_folders(tmp_path)
    status, err = refused([*QUICK, "--out", str(tmp_path / "run"), "--model", str(root / model), *extra], capsys)
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_out_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    status, err = refused([*QUICK, "--out", str(tmp_path / "a_file" / "run")], capsys)
    assert status == 1 and "cannot be created" in err and len(err.strip().splitlines()) == 1
    status, err = refused([*QUICK, "--out", str(tmp_path / "a_file")], capsys)
    assert status == 1 and "exists and is not a folder" in err
    if os.geteuid() != 0:     # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        status, err = refused([*QUICK, "--out", str(tmp_path / "locked" / "run")], capsys)
        assert status == 1 and "is not writable" in err


def test_failed_start_leaves_an_existing_run_folder_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in [("config.json", "{}"), ("metrics.jsonl", '{"step": 2}\n'), ("results.json", "{}"),
                       ("checkpoint.pt", "not a checkpoint")]:
        (out / name).write_text(text)
    before = snapshot(out)
    assert refused([*QUICK, "--out", str(out), "--data", str(tmp_path / "missing.jsonl")], capsys)[0] == 1
    assert refused([*QUICK, "--out", str(out), "--K", "0"], capsys)[0] == 2
    status, err = refused([*QUICK, "--out", str(out)], capsys)
    assert status == 1 and "checkpoint.pt: not a readable checkpoint" in err
    assert snapshot(out) == before


def test_a_run_with_other_settings_is_not_continued(tmp_path, tiny_base, capsys):
    out = run_folder(tmp_path, tiny_base)
    train.main(config.parse_args([*QUICK, "--out", str(out), "--meta-steps", "2"]))
    before = snapshot(out)
    status, err = refused([*QUICK, "--out", str(out), "--meta-steps", "2", "--m", "3"], capsys)
    assert status == 1 and "a run with other settings (--m 4 there, 3 now)" in err
    status, err = refused([*QUICK, "--out", str(out), "--meta-steps", "1"], capsys)
    assert status == 1 and "already at meta-step 2, past --meta-steps 1" in err
    assert snapshot(out) == before


def test_a_base_pretrained_with_other_settings_is_not_reused(tmp_path, tiny_base, capsys):
    out = run_folder(tmp_path, tiny_base)           # the session's tiny base, with no checkpoint beside it
    assert json.loads((out / "base" / "pretraining.json").read_text())["hidden"] == 48
    before = snapshot(out)
    status, err = refused([*QUICK, "--out", str(out), "--hidden", "64", "--heads", "2"], capsys)
    assert status == 1 and "a base pretrained with other settings (--hidden 48 there, 64 now)" in err
    assert snapshot(out) == before


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *QUICK, "--out", str(tmp_path / "run"),
                           "--data", str(tmp_path / "missing.jsonl")], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == f"train.py: error: {tmp_path / 'missing.jsonl'}: no such file\n"


# ----------------------------------------------------------------------------- evaluate.py and room.py

@pytest.mark.parametrize("argv, status, message", [
    (["--out", "{tmp}/nosuch"], 1, "--out {tmp}/nosuch: no such folder"),
    (["--out", "{tmp}/no_run"], 1, "--out {tmp}/no_run: no config.json there"),
    (["--out", "{tmp}/no_run", "--eval-targets", "0"], 2, "--eval-targets must be at least 1, not 0"),
    (["--out", "{tmp}/no_run", "--alpha", "0.1"], 2, "unrecognized arguments: --alpha 0.1"),
    (["--model", "{tmp}/nosuch", "--eval-data", "{tmp}/x.jsonl"], 1, "--model {tmp}/nosuch: no such folder"),
    (["--model", "{base}", "--eval-data", "{tmp}/nosuch.jsonl"], 1, "{tmp}/nosuch.jsonl: no such file"),
    (["--model", "{base}", "--alpha", "0"], 2, "--alpha must be above 0"),
])
def test_evaluate_refuses_bad_input_in_one_line(argv, status, message, tmp_path, tiny_base, capsys):
    (tmp_path / "no_run").mkdir()
    fill = lambda a: a.format(tmp=tmp_path, base=tiny_base)
    before = snapshot(tmp_path)
    out = ["--out", str(tmp_path / "eval")] if "--model" in argv else []
    code, err = evaluate_cli([*map(fill, argv), *out], capsys)
    assert code == status and fill(message) in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and not (tmp_path / "eval").exists()


def test_evaluate_command_line_error_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--out", str(tmp_path / "nosuch")],
                          cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == f"evaluate.py: error: --out {tmp_path / 'nosuch'}: no such folder " \
                                                   f"(give a train.py run folder, or --model)\n"


@pytest.mark.parametrize("argv, status, message", [
    (["--out", "{tmp}/nosuch"], 1, "room.py: error: --out {tmp}/nosuch/base: no such folder"),
    (["--out", "{run}", "--alpha", "0"], 2, "room.py: error: --alpha must be above 0, not 0.0"),
    (["--out", "{run}", "--targets", "0"], 2, "room.py: error: --targets must be at least 1, not 0"),
    (["--out", "{run}", "--lora-rank", "99"], 1, "room.py: error: LoRA rank 99 is larger than layer"),
    (["--out", "{run}", "--m", "x"], 2, "room.py: error: argument --m: invalid int value"),
])
def test_room_refuses_bad_input_in_one_line(argv, status, message, tmp_path, tiny_base, capsys):
    run = run_folder(tmp_path, tiny_base)
    fill = lambda a: a.format(tmp=tmp_path, run=run)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        room.main([fill(a) for a in argv])
    err = capsys.readouterr().err
    assert stopped.value.code == status and fill(message) in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
