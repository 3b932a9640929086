import dataclasses
import subprocess
import sys

import pytest

from recstack.cli import main
from recstack.config import ConfigError, apply_overrides, from_dict, to_dict


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.1
    steps: int = 10
    hidden: tuple[int, ...] = (512, 256)
    name: str = "x"
    flag: bool = False


def test_overrides_parse_each_type():
    cfg = apply_overrides(_Cfg(), ["lr=0.5", "steps=1e3", "hidden=64,32", "name=abc", "flag=true"])
    assert cfg == _Cfg(lr=0.5, steps=1000, hidden=(64, 32), name="abc", flag=True)
    assert from_dict(_Cfg, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(_Cfg(), ["lr"])
    with pytest.raises(ConfigError, match="flag: expected a boolean"):
        apply_overrides(_Cfg(), ["flag=maybe"])
    with pytest.raises(ConfigError, match="unknown config keys"):
        from_dict(_Cfg, {"lr": 1.0, "nope": 2})


def test_simulate_unknown_key_is_an_error_naming_valid_keys(tmp_path, capsys):
    assert main(["simulate", "--preset", "tiny", "--out", str(tmp_path), "--set", "n_userz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'n_userz'" in err and "n_users" in err


@pytest.mark.parametrize("stage", ["retrieval", "coarse", "fine"])
def test_train_unknown_key_is_an_error(tmp_path, capsys, stage, tiny_data):
    assert main(["train", stage, "--data", tiny_data, "--out", str(tmp_path), "--set", "no_such_key=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "recstack.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("simulate", "train", "export", "serve", "rank", "quickstart"):
        assert cmd in out


def test_serving_never_imports_training_code():
    """The server reads only the bundle: importing it must not pull torch or the trainers."""
    code = (
        "import sys, recstack.serving.server, recstack.serving.cascade;"
        "bad = [m for m in ('torch', 'retrieval', 'coarse_rank', 'fine_rank', 'recstack.data') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"serving imported: {r.stdout} {r.stderr[-500:]}"


def test_experiment_command_writes_the_report(tiny_data, tmp_path):
    out = tmp_path / "cvr"
    assert main(["experiment", "cvr", "--data", tiny_data, "--out", str(out), "--seeds", "1,2", "--quick"]) == 0
    assert (out / "report.md").exists() and (out / "results.json").exists() and list(out.glob("*.png"))


def test_experiment_and_bench_argument_errors(tiny_data, tmp_path, capsys):
    assert main(["experiment", "cvr", "--data", tiny_data, "--out", str(tmp_path), "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["bench", "retrieval"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
