"""
The run folder's safety: every file written atomically (a temporary file, then a rename), a checkpoint that holds
everything meta-training needs to continue exactly, and a stop on Ctrl-C that finishes the meta-step first.

A checkpoint (train.py writes it, OUT/checkpoint.pt) holds eta, psi, both Adam states, the step, the running means,
the part of the summary window not logged yet, the skip counter and every RNG state. Running the same command again
continues from it; metrics.jsonl is cut back to the checkpoint's step, so the lines after it are written once.

    python train.py --preset tiny --out runs/tiny    # stop it part-way (Ctrl-C, kill -9), run it again: it continues
"""
import hashlib
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
    changed = changed_settings(saved, {k: settings[k] for k in saved if k not in MAY_CHANGE and k in settings})
    if changed:
        raise ValueError(f"{path}: a run with other settings ({'; '.join(changed)}); rerun it with its settings or "
                         f"give another --out")
    if settings["meta_steps"] < checkpoint["step"]:
        raise ValueError(f"{path}: already at meta-step {checkpoint['step']}, past --meta-steps {settings['meta_steps']}")
    return checkpoint


def changed_settings(saved, now):
    """'--name X there, Y now' for each setting in `now` whose value differs from the one `saved` (a dict) holds."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} there, {v} now" for k, v in now.items() if saved.get(k) != v]


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


def stop_signals(announce=True):
    """Ctrl-C or SIGTERM: finish the meta-step, write a checkpoint, then stop; a second one stops at once.
    Returns the list the handler appends the signal to; the loop checks it after each meta-step.
    announce: say so on stderr (under torchrun every rank gets the signal, and rank 0 says so)."""
    stop = []

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if announce:
            print(f"\n{signal.Signals(signum).name}: finishing this meta-step, then a checkpoint (again: stop now)",
                  file=sys.stderr)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return stop


def default_signals():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------- evaluation that continues after a kill
# The held-out evaluation writes one file per finished target into OUT/eval_<F>, F the start of the fingerprint of the
# eta, psi and phi_0 it evaluates (so a run trained further evaluates into a new folder). A rerun reads what is there
# and evaluates only the missing targets; a partial evaluation made with other settings is refused, never mixed in.

# settings that may differ on a rerun: they do not change any one target's result (a target's result depends only on
# its index, so more or fewer targets is a longer or shorter prefix)
EVAL_MAY_CHANGE = (MAY_CHANGE - {"eval_data", "device"}) | {"log_every"}


class Refused(ValueError):
    """A run folder's contents that this command must not continue; its message is the one line to print."""


def eval_folder(out, fingerprint):
    return os.path.join(out, f"eval_{fingerprint[:12]}")


def fingerprint(*tensor_dicts):
    """sha256 of the tensors of some state dicts (names and values): which eta, psi and phi_0 an evaluation used."""
    digest = hashlib.sha256()
    for tensors in tensor_dicts:
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def eval_settings(settings):
    """What a partial evaluation must share with its rerun: the settings that change a target's result."""
    return {k: v for k, v in settings.items() if k not in EVAL_MAY_CHANGE}


def check_eval(folder, expected):
    """Refuse (Refused, one line naming the options) to continue a partial evaluation in `folder` that was made with
    other settings; nothing to refuse when there is none."""
    path = os.path.join(folder, "settings.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    changed = changed_settings(saved, expected)
    if changed:
        raise Refused(f"{folder}: a partial evaluation with other settings ({'; '.join(changed)}); rerun it with "
                      f"its settings, or remove {folder} to evaluate from the start")


def start_eval(folder, expected, write=True):
    """Check `folder` against the expected settings, write them there (write: this process writes; under torchrun
    rank 0 does), and return the finished targets' records {index: record}."""
    check_eval(folder, expected)
    os.makedirs(folder, exist_ok=True)
    if write:
        atomic_write(os.path.join(folder, "settings.json"), lambda f: f.write(json.dumps(expected, indent=1).encode()))
    done = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("target_") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    done[int(name[len("target_"):-len(".json")])] = json.load(f)
            except (ValueError, OSError) as e:
                raise Refused(f"{os.path.join(folder, name)}: not a readable result ({type(e).__name__}); "
                              f"remove it and rerun to evaluate that target again") from None
    return done


def save_eval_target(folder, i, record):
    atomic_write(os.path.join(folder, f"target_{i:05d}.json"), lambda f: f.write(json.dumps(record).encode()))
