"""The configuration: a table of bad files, each with the message an operator sees."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from meshd import config as configmod
from tests.conftest import ROOT

BAD = [
    ("[api]\nlisten = 9337\n", "[api] listen: expected a string, got 9337"),
    ("[api]\nlisten = \"localhost\"\n", "[api] listen: 'localhost' is not a usable address: missing :port"),
    ("[api]\nlisten = \"127.0.0.1:99999\"\n", "port '99999' is not a number from 0 to 65535"),
    ("[api]\nlisten = \"::1:9337\"\n", "IPv6 addresses need brackets"),
    ("[api]\nlisten = \"[::1:9337\"\n", "unclosed '['"),
    ("[api]\nlistne = \"127.0.0.1:1\"\n", "[api] listne: unknown key (known: listen,"),
    ("[apii]\n", "[apii]: unknown section"),
    ("api = 3\n", "[api]: must be a table"),
    ("[mesh]\nheartbeat_s = \"2s\"\n", "[mesh] heartbeat_s: expected a number, got '2s'"),
    ("[mesh]\nheartbeat_s = 0\n", "[mesh] heartbeat_s: must be greater than 0"),
    ("[mesh]\nheartbeat_s = 5\nheartbeat_timeout_s = 1\n", "[mesh] heartbeat_timeout_s: must be at least heartbeat_s"),
    ("[mesh]\nmax_frame_bytes = 100\n", "[mesh] max_frame_bytes: must be at least 4096"),
    ("[node]\nvram_gb = -1\n", "[node] vram_gb: must not be negative"),
    ("[node]\nvram_gb = true\n", "[node] vram_gb: expected a number, got True"),
    ("[node]\ngpus = [\"0\"]\n", "[node] gpus: expected a list of integers, got ['0']"),
    ("[node]\nclient = \"yes\"\n", "[node] client: expected true or false, got 'yes'"),
    ("[node]\nclient = true\nstandby = true\n", "[node] client: a client never serves"),
    ("[models]\nserve = \"gemma\"\n", "[models] serve: expected a list of strings, got 'gemma'"),
    ("[llama]\nbin_dir = \"/nonexistent/bin\"\n", "[llama] bin_dir: '/nonexistent/bin' is not a directory"),
    ("[llama]\nctx_size = 1.5\n", "[llama] ctx_size: expected an integer, got 1.5"),
    ("[log]\nlevel = \"loud\"\n", "[log] level: 'loud' is not one of debug, info, warning, error"),
    ("[log]\nformat = \"xml\"\n", "[log] format: 'xml' is not one of text, json"),
    ("[log]\nformat = \"JSON\"\n", "[log] format: 'JSON' is not one of text, json"),
    ("[log]\nformat = 1\n", "[log] format: expected a string, got 1"),
    ("[api\nlisten=1", "not valid TOML"),
    ("[mesh]\nheartbeat_s = nan\n", "[mesh] heartbeat_s: nan is not a finite number"),
    ("[mesh]\nheartbeat_timeout_s = inf\n", "[mesh] heartbeat_timeout_s: inf is not a finite number"),
    ("[api]\ndrain_s = -inf\n", "[api] drain_s: -inf is not a finite number"),
    ("[node]\nvram_gb = nan\n", "[node] vram_gb: nan is not a finite number"),
    ("[models]\ntensor_split = [1.0, nan]\n", "[models] tensor_split[1]: nan is not a finite number"),
    ("[models]\ntensor_split = [1.0, 0.0]\n", "[models] tensor_split[1]: 0.0 is not a finite number > 0"),
    ("[models]\ntensor_split = [-2.0, 1.0]\n", "[models] tensor_split[0]: -2.0 is not a finite number > 0"),
    ("[models]\nmax_rtt_ms = 0\n", "[models] max_rtt_ms: must be greater than 0"),
    ("[llama]\nlive_interval_s = 0\n", "[llama] live_interval_s: must be greater than 0"),
    ("[llama]\nlive_misses = 0\n", "[llama] live_misses: must be greater than 0"),
    ("[llama]\nlive_misses = 2.5\n", "[llama] live_misses: expected an integer, got 2.5"),
    ("[api]\nfirst_byte_timeout_s = -1\n", "[api] first_byte_timeout_s: must be greater than 0"),
    ("[api]\nfirst_byte_timeout_s = inf\n", "[api] first_byte_timeout_s: inf is not a finite number"),
    ("[api]\nstream_idle_timeout_s = 0\n", "[api] stream_idle_timeout_s: must be greater than 0"),
    ("[api]\nstream_idle_timeout_s = nan\n", "[api] stream_idle_timeout_s: nan is not a finite number"),
    ("[api]\nhead_timeout_s = 0\n", "[api] head_timeout_s: must be greater than 0"),
    ("[api]\nhead_timeout_s = nan\n", "[api] head_timeout_s: nan is not a finite number"),
    ("[api]\nbody_timeout_s = -5\n", "[api] body_timeout_s: must be greater than 0"),
    ("[api]\nbody_timeout_s = inf\n", "[api] body_timeout_s: inf is not a finite number"),
    ("[api]\nclient_stall_timeout_s = 0\n", "[api] client_stall_timeout_s: must be greater than 0"),
    ("[api]\nclient_stall_timeout_s = nan\n",
     "[api] client_stall_timeout_s: nan is not a finite number"),
    ("[llama]\nextra_args = [\"--api-key\", \"k\"]\n",
     "[llama] extra_args[0]: --api-key is meshd's to set"),
    ("[llama]\nextra_args = [\"--threads-http\", \"2\", \"--api-key-file=/k\"]\n",
     "[llama] extra_args[2]: --api-key-file is meshd's to set"),
    ("[llama]\nextra_args = [\"--no-slots\"]\n",
     "[llama] extra_args[0]: --no-slots would blind meshd to a split llama-server wedged"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_is_reported_with_its_key(tmp_path, text, message):
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(str(path))
    assert any(message in p for p in e.value.problems), e.value.problems
    assert all(p.startswith(str(path)) for p in e.value.problems)


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = tmp_path / "meshd.toml"
    path.write_text("[api]\nlisten = \"x\"\nfoo = 1\n[log]\nlevel = \"loud\"\n")
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(str(path))
    assert len(e.value.problems) == 3


def test_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv(configmod.ENV_VAR, raising=False)
    monkeypatch.setattr(configmod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert configmod.load() == configmod.Config()


def test_named_file_must_exist(tmp_path):
    with pytest.raises(configmod.ConfigError, match="no such file"):
        configmod.load(str(tmp_path / "absent.toml"))


def test_env_var_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "m.toml"
    path.write_text("[api]\nlisten = \"127.0.0.1:1234\"\n")
    monkeypatch.setenv(configmod.ENV_VAR, str(path))
    assert configmod.load().api.listen == "127.0.0.1:1234"


def test_ints_are_accepted_where_numbers_are_expected():
    cfg = configmod.from_dict({"mesh": {"heartbeat_s": 3}})
    assert cfg.mesh.heartbeat_s == 3.0 and isinstance(cfg.mesh.heartbeat_s, float)


def test_policy_tables_are_plugin_settings():
    cfg = configmod.from_dict({"policy": {"plugins": ["x"], "pinned": {"a": "b"}}})
    assert cfg.policy.settings == {"pinned": {"a": "b"}}


def test_documented_default_file_is_the_defaults():
    """etc/meshd.toml documents every option with its default: loading it changes nothing."""
    text = (ROOT / "etc/meshd.toml").read_text()
    uncommented = "\n".join(
        line[1:] if line.startswith("#") and line[1:2].isalpha() else line
        for line in text.splitlines()
    )
    import toml

    data = toml.loads(uncommented)
    cfg = configmod.from_dict(data)
    assert configmod.to_dict(cfg) == configmod.to_dict(configmod.Config())
    # and every key of the schema is in the file
    for section, values in configmod.to_dict(configmod.Config()).items():
        for key in values:
            assert f"{key} =" in text, f"[{section}] {key} is not documented in etc/meshd.toml"


def test_address_parsing():
    assert configmod.parse_address("[::1]:9337") == ("::1", 9337)
    assert configmod.parse_address("0.0.0.0:7842") == ("0.0.0.0", 7842)
    assert configmod.parse_address("host", default_port=1) == ("host", 1)
    assert configmod.tcp_endpoint("[::1]:80") == (
        f"tcp:80:interface=\\:\\:1:backlog={configmod.LISTEN_BACKLOG}")


def run_meshd(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshd", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )


def test_check_config_prints_effective_config_and_exits_0(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n[api]\nlisten = \"127.0.0.1:1234\"\n")
    r = run_meshd("--config", str(path), "--check-config")
    assert r.returncode == 0, r.stderr
    assert 'listen = "127.0.0.1:1234"' in r.stdout
    assert "Traceback" not in r.stderr


def test_check_config_lists_problems_and_exits_2(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text("[api]\nlisten = \"nope\"\n[log]\nlevel = 3\n")
    r = run_meshd("--config", str(path), "--check-config")
    assert r.returncode == 2
    assert "[api] listen" in r.stderr and "[log] level" in r.stderr
    assert "Traceback" not in r.stderr


FLOAT_KEYS = [(section, key) for section, cls in configmod.SECTIONS.items()
              for key, hint in typing.get_type_hints(cls).items()
              if typing.get_origin(hint) is not list and float in (hint, *typing.get_args(hint))]


@pytest.mark.parametrize("section, key", FLOAT_KEYS)
def test_every_float_key_refuses_nan(tmp_path, section, key):
    path = tmp_path / "meshd.toml"
    path.write_text(f"[{section}]\n{key} = nan\n")
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(str(path))
    assert any(f"[{section}] {key}: nan is not a finite number" in p for p in e.value.problems)


def test_check_config_refuses_a_nan_heartbeat(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n"
                    "[mesh]\nheartbeat_s = nan\n")
    r = run_meshd("--config", str(path), "--check-config")
    assert r.returncode == 2
    assert "[mesh] heartbeat_s: nan is not a finite number" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_reports_a_missing_model_file(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n")
    r = run_meshd("--config", str(path), "--check-config", "--model", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2
    assert "[models] serve[0]" in r.stderr and "nope.gguf" in r.stderr
    assert "Traceback" not in r.stderr


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n")
    r = run_meshd("--config", str(path), "--check-config", "--client", "--split")
    assert r.returncode == 0, r.stderr
    assert "client = true" in r.stdout and "split = true" in r.stdout


# -- a join token that does not parse: refused at start, not restarted (issue 12, defect 3) ------


def _a_token() -> str:
    from meshd.mesh import tokens

    return tokens.encode(tokens.Token("0123456789abcdef", "aaaa1111", "a" * 26, bytes(32),
                                      ("10.0.0.1:7842",), 2e9, False, b"k" * 32))


def _bit_flipped(text: str) -> str:
    i = len(text) // 2
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]


@pytest.mark.parametrize("token, why", [
    ("garbage", "not a meshd invite token"),
    (_a_token()[:40], "cut short"),
    (_bit_flipped(_a_token()), "checksum does not match"),
], ids=["garbage", "truncated", "bit-flipped"])
def test_meshd_refuses_to_start_with_a_join_token_that_does_not_parse(tmp_path, token, why):
    from meshd.cli.meshd import EXIT_BAD_TOKEN

    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}/state\"\nmodels_dir = \"{tmp_path}\"\n")
    r = run_meshd("--config", str(path), "--join", token)
    assert r.returncode == EXIT_BAD_TOKEN, r.stderr
    assert "token 1" in r.stderr and why in r.stderr
    assert "meshctl token" in r.stderr
    assert "created a new mesh" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "state" / "mesh.json").exists()


def test_check_config_lists_a_join_token_that_does_not_parse(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n"
                    "[mesh]\njoin = [\"garbage\"]\n")
    r = run_meshd("--config", str(path), "--check-config")
    assert r.returncode == 2
    assert "[mesh] join (or --join) token 1: not a meshd invite token" in r.stderr


def test_a_join_token_that_parses_passes_check_config(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(f"[node]\nstate_dir = \"{tmp_path}\"\nmodels_dir = \"{tmp_path}\"\n")
    r = run_meshd("--config", str(path), "--check-config", "--join", _a_token())
    assert r.returncode == 0, r.stderr
