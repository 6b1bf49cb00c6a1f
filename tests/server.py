"""Start vLLM's OpenAI server (through one of our launchers) for a test and stop it afterwards."""
import contextlib
import os
import subprocess
import sys
import time
import urllib.request

from spawn import free_port

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}


@contextlib.contextmanager
def openai_server(model_dir, launcher=("-m", "flute_vllm"), extra_args=(), timeout=600):
    """Yields the base URL. ``launcher``: args before the module name, e.g. ("launch.py",)."""
    port = free_port()
    cmd = [sys.executable, *launcher, "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--port", str(port), "--enforce-eager", "--max-model-len", "2048", "--dtype", "bfloat16",
           *extra_args]
    log = open(os.path.join(str(model_dir), f"server-{port}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log: {log.name}\n" + open(log.name).read()[-3000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server did not start in {timeout}s; log: {log.name}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
