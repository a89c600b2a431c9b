"""
Tests of reliability: skipped targets and steps counted, the stop on too many skips, atomic checkpoints, exact
continuation after Ctrl-C or kill -9, evaluation continued after a kill, determinism; and torchrun: 2 processes on the
CPU give the eta and psi of one. (Bad input: test_inputs.py.)

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

import base_model
import config
import evaluate
import generator
import train
from inner_loop import init_lora, lora_targets
from scorer import Scorer

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = ["--preset", "tiny", "--eval-targets", "2"]


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


def test_kill_9_and_rerun_ends_as_an_uninterrupted_run(tmp_path, tiny_base, capsys):
    """train.py --preset tiny killed with SIGKILL after its first checkpoint, then run again, writes the same
    metrics.jsonl (wall-clock fields aside) and results.json as a run that was never stopped."""
    args = ["--preset", "tiny", "--meta-steps", "12", "--checkpoint-every", "2", "--eval-targets", "6"]
    straight, out = run_folder(tmp_path, tiny_base, "straight"), run_folder(tmp_path, tiny_base, "killed")
    train.main(config.parse_args([*args, "--out", str(straight)]))
    running = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *args, "--out", str(out)], cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and running.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    running.send_signal(signal.SIGKILL)
    assert running.wait() == -signal.SIGKILL
    assert torch.load(out / "checkpoint.pt")["step"] < 12 and not (out / "results.json").exists()
    capsys.readouterr()
    train.main(config.parse_args([*args, "--out", str(out)]))
    assert "continuing from the checkpoint at meta-step" in capsys.readouterr().out
    assert same_rows(without_clock(out / "metrics.jsonl"), without_clock(straight / "metrics.jsonl"))
    assert (out / "results.json").read_bytes() == (straight / "results.json").read_bytes()


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
    status, err = evaluate_cli([*argv, "--alpha", "0.2"], capsys)
    assert status == 1 and "a partial evaluation with other settings (--alpha 0.1 there, 0.2 now)" in err, err
    assert len(err.strip().splitlines()) == 1
    assert evaluate_cli([*argv, "--eval-targets", "3"], capsys)[0] == 0   # more targets: the same ones, and one more
    assert len(eval_files(out)) == 3


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
