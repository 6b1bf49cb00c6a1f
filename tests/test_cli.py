"""The command line: flags (ours and FLUTE's spellings), errors, and the launchers."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv,message", [
    (["eval", "/no/model", "--text", "/no/file.txt"], "--text /no/file.txt: no such file"),
    (["quantize", "a"], "quantize needs SRC and DST"),
    (["quantize", "a", "b", "--num-bits", "5"], "invalid choice: 5"),
    (["quantize", "a", "b", "--group-size", "100"], "invalid choice: 100"),
    (["quantize", "a", "b", "--nfl-table"], "--nfl-table needs --nfl"),
    (["quantize", "a", "b", "--nfl", "--steps", "0"], "'0' is not a positive integer"),
    (["quantize", "a", "b", "--nfl", "--calibration", "/no/cal.txt"], "--calibration /no/cal.txt: no such file"),
])
def test_cli_rejects_bad_flags(argv, message):
    r = subprocess.run([sys.executable, "-m", "flute_vllm", *argv], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr


def test_quantize_cli_wrong_path():
    r = subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", "/no/such/model", "/tmp/x"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "does not exist" in r.stderr


@pytest.mark.parametrize("cmd", [["--help"], ["quantize", "--help"], ["eval", "--help"], ["smollm2", "--help"]])
def test_cli_help(cmd):
    r = subprocess.run([sys.executable, "-m", "flute_vllm", *cmd], capture_output=True, text=True)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_quantize_accepts_flute_spellings(cache_dir, tmp_path):
    from flute_vllm.demo import tiny_llama

    src = tiny_llama(os.path.join(cache_dir, "tiny-llama-dense"))
    dst = str(tmp_path / "q")
    r = subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", "--pretrained_model_name_or_path", src,
                        "--save_directory", dst, "--num_bits", "3", "--group_size", "128"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["table"]) == ("flute", 3, 128, "nf")
    assert os.path.exists(os.path.join(dst, "tokenizer.json"))


@pytest.mark.parametrize("launcher", [["-m", "flute_vllm"], [os.path.join(ROOT, "launch.py")]])
def test_launchers_register_flute_then_run_the_module(launcher):
    pytest.importorskip("vllm")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
    r = subprocess.run([sys.executable, *launcher, "registry_probe", "--model", "m", "--quantization", "flute"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "flute": True, "argv": ["--model", "m", "--quantization", "flute"]}


def test_entry_point_registers_flute_in_plain_vllm():
    pytest.importorskip("vllm")
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("flute") == "flute_vllm:register"
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS; "
            "print('flute' in QUANTIZATION_METHODS)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().endswith("True"), r.stderr[-2000:]


def test_quantize_unknown_model_type_fails_clearly(tmp_path):
    src = tmp_path / "weird"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    r = subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "error: cannot load" in r.stderr and "no-such-architecture" in r.stderr
    assert "Traceback" not in r.stderr
