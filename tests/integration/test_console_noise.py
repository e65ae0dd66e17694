"""Third-party warnings go to the log file and the toolkit's own stay on the console, in a fresh Python process (as
the CLI starts)."""

from __future__ import annotations

NOISE = """
import logging, sys, warnings
from finetune import cli
if sys.argv[1] == "quiet":
    cli.send_third_party_noise_to_log()
warnings.warn_explicit("a library's deprecation", FutureWarning, "/site-packages/somelib/core.py", 7)
warnings.warn_explicit("a library's notice", UserWarning, "/site-packages/somelib/core.py", 8)
warnings.warn_explicit("our own warning", UserWarning, cli.__file__, 9)
import bitsandbytes  # on a machine without the 'kernels' package it logs "Failed to load CPU gemm_4bit_forward"
# what the 'kernels' package (transformers loads it with bitsandbytes) logs on every offline training run
logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'kernels-community/x'")
"""


def test_third_party_warnings_go_to_the_log_file_and_ours_stay_on_the_console(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(repo_root)}

    def run(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", NOISE, mode], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    err = run("quiet")
    log = (tmp_path / "cache" / "logs" / "third-party.log").read_text(encoding="utf-8")
    assert "our own warning" in err
    assert "a library's deprecation" not in err and "a library's notice" not in err and "gemm_4bit" not in err
    assert "a library's deprecation" in log and "a library's notice" in log and "our own warning" not in log
    assert "publisher trust" not in err and "publisher trust" in log
    if "gemm_4bit" not in log:  # this bitsandbytes says nothing here: then it says nothing without the filter either
        assert "gemm_4bit" not in run("loud")


BARS = """
import sys
from finetune.console import library_output
library_output(verbose=sys.argv[1] == "loud")  # as the CLI does before a command imports the libraries
from transformers.utils import logging as transformers_logging
list(transformers_logging.tqdm(range(3), desc="transformers bar"))
transformers_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
from huggingface_hub.utils import tqdm as hub_tqdm
list(hub_tqdm(range(3), desc="hub bar"))
import datasets
datasets.Dataset.from_dict({"a": [1, 2, 3]}).map(lambda row: row, desc="datasets bar")
"""


def test_library_progress_bars_and_warnings_only_with_verbose(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DATASETS_"))}
    env.update(PYTHONPATH=str(repo_root), HF_HOME=str(tmp_path / "hf"))

    def run(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", BARS, mode], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    loud, quiet = run("loud"), run("quiet")
    for line in ("transformers bar", "hub bar", "datasets bar", "a transformers warning"):
        assert line in loud and line not in quiet, (line, quiet)
