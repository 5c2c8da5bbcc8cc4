"""The runtime's library checks, and the interactive chat driven through stdin."""
from __future__ import annotations

import shutil
import subprocess
import sys

from clitools import ENV, NEUTRAL_CWD
from steer_gguf import ExpertRule, ModelRef, Profile, model_info
from steer_gguf.engine import runtime


def py(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                          env=env or ENV, timeout=120)


def test_llama_cpp_imported_first_with_another_library(tmp_path):
    other = tmp_path / "otherlib"
    shutil.copytree(runtime.lib_dir(), other)
    env = dict(ENV, LLAMA_CPP_LIB_PATH=str(other))
    r = py("import llama_cpp, steer_gguf\n"
           "try:\n    from steer_gguf import SteeredLlama\n"
           "except steer_gguf.SteerError as e:\n    print('refused:', e)\n", env)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "import steer_gguf first" in r.stdout


def test_import_order_steer_gguf_first_uses_our_library():
    r = py("import steer_gguf, llama_cpp\nfrom steer_gguf import SteeredLlama\n"
           "print(llama_cpp.llama_cpp._lib._name)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(runtime.lib_dir()))


def test_version_mismatch_is_refused():
    r = py("import steer_gguf, llama_cpp\nllama_cpp.__version__ = '0.0.1'\n"
           "try:\n    from steer_gguf import SteeredLlama\n"
           "except steer_gguf.SteerError as e:\n    print('refused:', e)\n")
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and runtime.load()[1].LLAMA_CPP_PYTHON_VERSION in r.stdout


def test_interactive_chat(make, tmp_path):
    model = make("qwen3moe", n_layer=4)
    info = model_info(model)
    prof = tmp_path / "p.json"
    Profile(ModelRef.of(info), [ExpertRule(1, 2, "activate")], name="force2").save(prof)
    script = f"hello\n/profile {prof}\nhi there\n/compare\n/profile off\n/profile {tmp_path}/missing.json\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "steer_gguf", "chat", str(model), "-n", "4", "-t", "1",
                        "--temperature", "0"], input=script, capture_output=True, text=True, cwd=NEUTRAL_CWD,
                       env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "profile: none" in out and "profile: force2" in out
    assert "--- unsteered" in out and "--- steered (force2)" in out
    assert "no such profile" in r.stderr  # a bad /profile is reported and the chat goes on
    assert out.rstrip().endswith(">")  # back at the prompt after every command


def test_llama_cpp_warnings_stay_quiet_unless_verbose():
    """A context larger than the model's training context makes llama.cpp warn; that is
    llama.cpp's log, shown with --verbose only."""
    from clitools import cli
    from steer_gguf.front.demo import DEMO_MODEL

    args = ("generate", DEMO_MODEL, "-p", "Hello!", "--chat", "-n", "4", "-t", "1", "--ctx", "1024")
    quiet, loud = cli(*args), cli(*args, "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stderr == "", quiet.stderr
    assert "n_ctx_train" in loud.stderr


def test_n_ctx_none_takes_the_models_context():
    from steer_gguf import SteeredLlama
    from steer_gguf.front.demo import DEMO_MODEL

    info = model_info(DEMO_MODEL)
    llm = SteeredLlama(DEMO_MODEL, n_ctx=None, n_threads=1)
    try:
        assert info.n_ctx_train == 512 and llm.n_ctx() == 512
    finally:
        llm.close()
