"""
Tests of train.py's reliability: bad input refused before any work, skipped targets and steps counted, the stop
on too many skips, atomic checkpoints, exact continuation after Ctrl-C or kill -9, determinism; and torchrun:
2 processes on the CPU give the eta and psi of one.

    OMP_NUM_THREADS=1 python -m pytest -q test_reliability.py
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import DistilBertConfig, LlamaConfig, LlamaForCausalLM

import base_model
import config
import evaluate
import generator
import room
import train
from inner_loop import init_lora, lora_targets
from scorer import Scorer

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = ["--preset", "tiny", "--eval-targets", "2"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A pretrained --preset tiny base (4 s), copied into each run folder that needs one."""
    out = tmp_path_factory.mktemp("base_run")
    train.load_or_pretrain_base(config.parse_args(["--preset", "tiny", "--out", str(out)]))
    return str(out / "base")


def run_folder(tmp_path, tiny_base, name="run"):
    out = tmp_path / name
    shutil.copytree(tiny_base, out / "base")
    return out


def without_clock(path):
    """metrics.jsonl's rows without the wall-clock fields (keys with 'time' or 'sec')."""
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in rows]


def same_rows(a, b):   # json's NaN != NaN, so compare the rows as text
    return json.dumps(a) == json.dumps(b)


def refused(argv, capsys):
    """(exit status, stderr) of the command line train.py argv, run in this process."""
    capsys.readouterr()             # what came before
    with pytest.raises(SystemExit) as stopped:
        train.cli(argv)
    return stopped.value.code, capsys.readouterr().err


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


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


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *QUICK, "--out", str(tmp_path / "run"),
                           "--data", str(tmp_path / "missing.jsonl")], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == f"train.py: error: {tmp_path / 'missing.jsonl'}: no such file\n"


# ----------------------------------------------------------------------------- skipped targets and steps

def initial_eta_psi(out, cfg):
    model, _ = base_model.load(str(out / "base"))
    torch.manual_seed(cfg.seed)
    eta = Scorer(model.config.hidden_size, cfg.scorer_width)
    return eta.state_dict(), init_lora(model, lora_targets(model), cfg.lora_rank, seed=cfg.seed)


def test_garbage_generations_are_skipped_counted_and_stop_the_run(tmp_path, tiny_base, monkeypatch):
    out = run_folder(tmp_path, tiny_base)
    monkeypatch.setattr(generator, "decode", lambda model, adapters, scale, tok, prompts, *a, **k: ["!?"] * len(prompts))
    cfg = config.parse_args([*QUICK, "--out", str(out), "--meta-steps", "6"])
    with pytest.raises(SystemExit, match="stopped at meta-step 2: 2 meta-steps skipped their update"):
        train.main(cfg)
    logged = without_clock(out / "metrics.jsonl")
    assert logged == [{"step": 2, "targets": 4, "skipped": 4, "skipped_steps": 2}]   # 2 targets a step, none parsed
    saved = torch.load(out / "checkpoint.pt")
    eta0, psi0 = initial_eta_psi(out, cfg)
    assert saved["step"] == 2 and saved["skipped_steps"] == 2 and saved["eta_opt"]["state"] == {}
    assert all(torch.equal(saved["eta"][k], eta0[k]) for k in eta0)          # eta and psi untouched
    assert all(torch.equal(saved["psi"][k], psi0[k]) for k in psi0)
    monkeypatch.undo()                  # a usable checkpoint: the same command continues from it
    train.main(config.parse_args([*QUICK, "--out", str(out), "--meta-steps", "6"]))
    logged = without_clock(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [2, 4, 6] and logged[-1]["skipped_steps"] == 0
    if importlib.util.find_spec("matplotlib"):          # the curve is drawn although the first line has no means
        assert (out / "meta_training.png").stat().st_size > 0


def test_overflowing_inner_learning_rate_skips_updates(tmp_path, tiny_base):
    out = run_folder(tmp_path, tiny_base)
    cfg = config.parse_args([*QUICK, "--out", str(out), "--meta-steps", "4", "--alpha", "1e39"])   # > float32's max
    with pytest.raises(SystemExit, match="2 meta-steps skipped their update"):
        train.main(cfg)
    assert without_clock(out / "metrics.jsonl") == [{"step": 2, "targets": 4, "skipped": 0, "skipped_steps": 2}]
    saved = torch.load(out / "checkpoint.pt")
    eta0, psi0 = initial_eta_psi(out, cfg)
    assert all(torch.equal(saved["eta"][k], eta0[k]) for k in eta0)
    assert all(torch.equal(saved["psi"][k], psi0[k]) for k in psi0)
    assert saved["running"] == {"improvement": 0.0, "g_norm": None}        # no non-finite number got in


# ----------------------------------------------------------------------------- checkpoints, continuation, determinism

def test_same_seed_same_metrics_and_results(tmp_path, tiny_base):
    for name in ("a", "b"):
        train.main(config.parse_args([*QUICK, "--out", str(run_folder(tmp_path, tiny_base, name)), "--meta-steps", "4"]))
    a, b = without_clock(tmp_path / "a" / "metrics.jsonl"), without_clock(tmp_path / "b" / "metrics.jsonl")
    assert same_rows(a, b) and len(a) == 2 and a[-1]["skipped_steps"] == 0   # every step updated eta and psi
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()


def test_ctrl_c_finishes_the_step_and_the_rerun_continues_exactly(tmp_path, tiny_base, monkeypatch):
    args = [*QUICK, "--meta-steps", "5", "--checkpoint-every", "100"]
    train.main(config.parse_args([*args, "--out", str(run_folder(tmp_path, tiny_base, "straight"))]))
    out = run_folder(tmp_path, tiny_base, "stopped")
    calls, meta_step = [], train.meta_step

    def ctrl_c_in_step_2(*a, **k):      # Ctrl-C while the first target of meta-step 2 is being worked on
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return meta_step(*a, **k)
    monkeypatch.setattr(train, "meta_step", ctrl_c_in_step_2)
    with pytest.raises(SystemExit) as stopped:
        train.main(config.parse_args([*args, "--out", str(out)]))
    assert stopped.value.code == 128 + signal.SIGINT and len(calls) == 4     # meta-step 2 was finished, not cut
    assert torch.load(out / "checkpoint.pt")["step"] == 2 and len(without_clock(out / "metrics.jsonl")) == 1
    monkeypatch.undo()
    train.main(config.parse_args([*args, "--out", str(out)]))
    assert same_rows(without_clock(out / "metrics.jsonl"), without_clock(tmp_path / "straight" / "metrics.jsonl"))
    assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()


def test_half_saved_base_is_not_reused(tmp_path, monkeypatch, capsys):
    out, save = tmp_path / "run", base_model.save

    def killed_mid_save(model, tok, folder):
        save(model, tok, folder)
        raise KeyboardInterrupt      # before the rename: only base.tmp is on disk
    monkeypatch.setattr(base_model, "save", killed_mid_save)
    args = ["--preset", "tiny", "--out", str(out), "--pretrain-steps", "2", "--meta-steps", "0", "--eval-targets", "1"]
    with pytest.raises(KeyboardInterrupt):
        train.main(config.parse_args(args))
    assert (out / "base.tmp" / "config.json").exists() and not (out / "base").exists()
    monkeypatch.undo()
    train.main(config.parse_args(args))
    assert "reusing" not in capsys.readouterr().out
    assert (out / "base" / "config.json").exists() and not (out / "base.tmp").exists()


def test_kill_9_and_rerun_ends_as_an_uninterrupted_run(tmp_path):
    """train.py --preset tiny killed with SIGKILL after its first checkpoint, then run again, writes the same
    metrics.jsonl (wall-clock fields aside) and results.json as a run that was never stopped."""
    args = [sys.executable, os.path.join(HERE, "train.py"), "--preset", "tiny", "--pretrain-steps", "200",
            "--meta-steps", "12", "--checkpoint-every", "2", "--eval-targets", "6"]
    subprocess.run([*args, "--out", str(tmp_path / "straight")], check=True, cwd=HERE, capture_output=True)
    out = tmp_path / "killed"
    running = subprocess.Popen([*args, "--out", str(out)], cwd=HERE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and running.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    running.send_signal(signal.SIGKILL)
    assert running.wait() == -signal.SIGKILL
    assert torch.load(out / "checkpoint.pt")["step"] < 12 and not (out / "results.json").exists()
    again = subprocess.run([*args, "--out", str(out)], check=True, cwd=HERE, capture_output=True, text=True)
    assert "continuing from the checkpoint at meta-step" in again.stdout
    assert same_rows(without_clock(out / "metrics.jsonl"), without_clock(tmp_path / "straight" / "metrics.jsonl"))
    assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()


# ----------------------------------------------------------------------------- evaluation: continued after a kill

def eval_files(out):
    return sorted(out.glob("eval_*/target_*.json"))


def test_killed_evaluation_continues_with_the_missing_targets_only(tmp_path, tiny_base, monkeypatch):
    """train.py killed with SIGKILL part-way through its final evaluation, then run again: the rerun evaluates only
    the targets that have no result file yet, and writes the results.json of a run that was never stopped."""
    args = [*QUICK, "--meta-steps", "2", "--eval-targets", "6"]
    straight = run_folder(tmp_path, tiny_base, "straight")
    train.main(config.parse_args([*args, "--out", str(straight)]))
    out = run_folder(tmp_path, tiny_base, "killed")
    running = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *args, "--out", str(out)], cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(eval_files(out)) < 2 and running.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    running.send_signal(signal.SIGKILL)
    assert running.wait() == -signal.SIGKILL and not (out / "results.json").exists()
    before = {f.name: f.read_bytes() for f in eval_files(out)}
    assert 2 <= len(before) < 6
    evaluated, evaluate_target = [], evaluate.evaluate_target
    monkeypatch.setattr(evaluate, "evaluate_target", lambda *a, **k: evaluated.append(a[8]) or evaluate_target(*a, **k))
    train.main(config.parse_args([*args, "--out", str(out)]))
    assert len(evaluated) == 6 - len(before)                               # only the missing targets
    assert all(f.read_bytes() == before[f.name] for f in eval_files(out) if f.name in before)
    assert (out / "results.json").read_bytes() == (straight / "results.json").read_bytes()
    evaluated.clear()
    train.main(config.parse_args([*args, "--out", str(out)]))               # a finished evaluation: nothing to redo
    assert evaluated == [] and (out / "results.json").read_bytes() == (straight / "results.json").read_bytes()


def evaluate_cli(argv, capsys):
    """(exit status, stderr) of evaluate.py's command line argv, run in this process (0: it ran to the end)."""
    capsys.readouterr()
    try:
        evaluate.cli(argv)
    except SystemExit as stopped:
        return stopped.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_partial_evaluation_with_other_settings_is_refused(tmp_path, tiny_base, capsys):
    out = tmp_path / "eval"
    argv = ["--model", tiny_base, "--out", str(out), *QUICK, "--eval-targets", "2"]
    assert evaluate_cli(argv, capsys)[0] == 0
    status, err = evaluate_cli([*argv, "--alpha", "0.1"], capsys)
    assert status == 1 and "a partial evaluation with other settings (--alpha 0.2 there, 0.1 now)" in err, err
    assert len(err.strip().splitlines()) == 1
    assert evaluate_cli([*argv, "--eval-targets", "3"], capsys)[0] == 0   # more targets: the same ones, and one more
    assert len(eval_files(out)) == 3


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


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_give_the_eta_and_psi_of_one(tmp_path, tiny_base):
    """torchrun --nproc_per_node=2 (gloo, loopback only) against one process, the same global batch and seeds."""
    args = [*QUICK, "--meta-batch", "4", "--meta-steps", "4", "--eval-targets", "6"]
    one, two = run_folder(tmp_path, tiny_base, "one"), run_folder(tmp_path, tiny_base, "two")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}   # one thread each: same arithmetic
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args, "--out", str(one)], check=True, cwd=HERE,
                   env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "train.py"), *args, "--out", str(two)], check=True, cwd=HERE, env=env,
                   capture_output=True)
    for name in ("eta.pt", "psi.pt"):
        a, b = torch.load(one / name), torch.load(two / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        assert all(torch.equal(a[k], b[k]) for k in a)    # in fact bit for bit: the same additions, same order
    assert same_rows(without_clock(one / "metrics.jsonl"), without_clock(two / "metrics.jsonl"))
    assert (one / "results.json").read_bytes() == (two / "results.json").read_bytes()   # evaluation split, gathered
