"""
Shared fixtures of the tests: one pretrained --preset tiny base for the whole session.
"""
import pytest

import config
import train


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A pretrained --preset tiny base (about 10 s), copied into each run folder that needs one."""
    out = tmp_path_factory.mktemp("base_run")
    train.load_or_pretrain_base(config.parse_args(["--preset", "tiny", "--out", str(out)]))
    return str(out / "base")
