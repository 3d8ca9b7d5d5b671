"""Loaded by every process of the multi-process tests (this folder is put first on PYTHONPATH).

RLPHF_TRACE_WRITES=<root>:<log prefix>: log each file this rank creates, writes, renames or removes
under <root> to <log prefix>.<rank> (Python's audit hooks see open/os.rename/os.mkdir/...; files
written by native code, such as safetensors' and torch.save's, are not seen).
RLPHF_FAIL_ON_RANK=<rank>: that rank's reward model fails with a one-line rlphf error the first time
it scores, as when one node of a job reads a reward model that is broken for it alone.
"""

import os
import sys

_rank = os.environ.get("RANK")
_trace = os.environ.get("RLPHF_TRACE_WRITES")
if _rank is not None and _trace:
    _root, _, _prefix = _trace.partition(":")
    _root = os.path.realpath(_root)
    _log = open(f"{_prefix}.{_rank}", "a", buffering=1)  # noqa: SIM115 - open for the process's life
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _writes(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _write_flags)
            if not writing or isinstance(path, int):
                return None
            return path
        if event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
            return args[0]
        return None

    def _hook(event, args):
        path = _writes(event, args)
        if path is None:
            return
        try:
            resolved = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if resolved.startswith(_root + os.sep):
            _log.write(f"{event}\t{resolved}\n")

    sys.addaudithook(_hook)

if _rank is not None and _rank == os.environ.get("RLPHF_FAIL_ON_RANK"):
    from rlphf_cli.errors import InputError
    from rlphf_cli.training import reward

    def _broken(self, instructions, responses):
        raise InputError(f"{self.rm_dir}: injected failure on rank {_rank}")

    reward.RewardScorer.score = _broken
