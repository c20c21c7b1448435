"""Subprocess body of the fault-injection tests: runs CLI cases, each in a forked child.

stdin: JSON list of {"argv": [...], "fault": "point[@n]" or null, "env": {...}, "log": path}.
stdout (last line): JSON list of {"signal": int or null, "rc": int or null}.
The parent imports everything once and never computes with torch, so each forked child starts
warm and safe; a child with a fault kills itself with SIGKILL at that point (utils.fault_point).
"""
import json
import os
import sys

import torch  # noqa: F401 - imported once here, before the forks
import transformers  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

import aqlmkit.app.job  # noqa: F401
import aqlmkit.formats.aqlm_hf  # noqa: F401
import aqlmkit.pipeline.quantize  # noqa: F401
from aqlmkit.cli import main


def run_case(case: dict) -> dict:
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            fd = os.open(case["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(case.get("env") or {})
            if case.get("fault"):
                os.environ["AQLMKIT_FAULT_AT"] = case["fault"]
            torch.set_num_threads(1)
            code = main(case["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "rc": None}
    return {"signal": None, "rc": os.WEXITSTATUS(status)}


if __name__ == "__main__":
    cases = json.loads(sys.stdin.read())
    print(json.dumps([run_case(c) for c in cases]))
