"""
The run folder's safety: every file written atomically (a temporary file, then a rename), a checkpoint that holds
everything meta-training needs to continue exactly, and a stop on Ctrl-C that finishes the meta-step first.

A checkpoint (train.py writes it, OUT/checkpoint.pt) holds eta, psi, both Adam states, the step, the running means,
the part of the summary window not logged yet, the skip counter and every RNG state. Running the same command again
continues from it; metrics.jsonl is cut back to the checkpoint's step, so the lines after it are written once.

    python train.py --preset tiny --out runs/tiny    # stop it part-way (Ctrl-C, kill -9), run it again: it continues
"""
import json
import os
import random
import signal
import sys

import torch

# settings that may differ when a run is continued: they do not change what meta-training computes
MAY_CHANGE = {"out", "meta_steps", "eval_targets", "limit", "eval_data", "device", "checkpoint_every", "max_skip_share"}


def atomic_write(path, write):
    """write(f) into path.tmp, then a rename: a kill leaves the old file or the new one, never half of one."""
    with open(f"{path}.tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def save(path, state):
    atomic_write(path, lambda f: torch.save(state, f))


def check_writable(out):
    """--out must be a folder that can be written in, or one that can be created. Nothing is created here."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out}: exists and is not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def read(out, settings):
    """OUT/checkpoint.pt, or None when there is none. Refused (ValueError, one line) when it cannot be read, was
    written with settings that change what is computed, or is past --meta-steps. settings: the run's Config as a dict."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    try:
        checkpoint = torch.load(path, weights_only=True)
    except Exception as e:     # whatever the unpickler raises: one line naming the file, no traceback
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    saved = checkpoint["config"]
    changed = [f"--{k.replace('_', '-')} {saved[k]} there, {settings[k]} now" for k in saved
               if k not in MAY_CHANGE and k in settings and settings[k] != saved[k]]
    if changed:
        raise ValueError(f"{path}: a run with other settings ({'; '.join(changed)}); rerun it with its settings or "
                         f"give another --out")
    if settings["meta_steps"] < checkpoint["step"]:
        raise ValueError(f"{path}: already at meta-step {checkpoint['step']}, past --meta-steps {settings['meta_steps']}")
    return checkpoint


def rng_states(stream_rng):
    """Every RNG meta-training draws from: the targets' stream, Python's, torch's (and CUDA's)."""
    states = {"stream": stream_rng.getstate(), "python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states, stream_rng):
    stream_rng.setstate(states["stream"])
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def keep_logged_lines(log_path, step):
    """metrics.jsonl cut back to its lines up to `step` (the later ones came from work that is now redone)."""
    lines = open(log_path).read().splitlines(keepends=True) if os.path.exists(log_path) else []
    kept = "".join(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step)
    atomic_write(log_path, lambda f: f.write(kept.encode()))


def stop_signals():
    """Ctrl-C or SIGTERM: finish the meta-step, write a checkpoint, then stop; a second one stops at once.
    Returns the list the handler appends the signal to; the loop checks it after each meta-step."""
    stop = []

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this meta-step, then a checkpoint (again: stop now)",
              file=sys.stderr)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return stop


def default_signals():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
