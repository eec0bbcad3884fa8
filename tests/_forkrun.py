"""Runs many short command invocations fast: imports torch and nsvit-fast once, then forks one
child per case (JSON list on stdin), each with its own working directory, environment, stdout /
stderr files, file-size and address-space limits and alarm (120 s unless the case sets one). Prints the children's exit codes as a JSON list.

    python tests/_forkrun.py cli            # each case: nsvit_fast.cli.main(case["argv"])
    python tests/_forkrun.py script BENCH   # each case: runpy of case["script"] as __main__, argv case["argv"]

Used by test_hostile.py and test_bench_scripts.py: forking skips the ~3 s import per case.
"""

import importlib
import json
import os
import resource
import runpy
import signal
import sys
import traceback

mode = sys.argv[1]
if mode == "script":
    sys.path.insert(0, sys.argv[2])
# paid once, before the forks; the subcommands' lazy imports too (~0.9 s per case otherwise).
# Import-time warnings are still checked through `python -m nsvit_fast` in test_hostile.
PRELOAD = ["torch", "timm", "yaml", "PIL.Image", "safetensors.torch", "torchvision.datasets", "nsvit_fast.cli",
           "nsvit_fast.train", "nsvit_fast.eval", "nsvit_fast.analysis", "nsvit_fast.synth", "nsvit_fast.viz"]
if mode == "script":
    PRELOAD += ["scipy.stats", "matplotlib", "skimage.data", "nsvit_fast.demo", "nsvit_fast.pretrain", "common"]
for name in PRELOAD:
    importlib.import_module(name)
import nsvit_fast.cli  # noqa: E402


def child(c: dict) -> int:
    os.chdir(c["cwd"])
    os.environ.update(c.get("env", {}))
    for fd, name in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(c["log"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if c.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (c["fsize"], c["fsize"]))
    if c.get("as"):  # a huge allocation is refused whatever the host's overcommit setting
        resource.setrlimit(resource.RLIMIT_AS, (c["as"], c["as"]))
    signal.alarm(c.get("alarm", 120))  # a case wrongly accepted starts its run: end it, and the case fails
    try:
        if mode == "cli":
            return nsvit_fast.cli.main(c["argv"])
        sys.argv = [c["script"], *c["argv"]]
        runpy.run_path(c["script"], run_name="__main__")
        return 0
    except SystemExit as e:
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


cases = json.load(sys.stdin)
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
par = max(2, min(4, cpus))  # a container's CPUs, not the host's
running, results = {}, {}
todo = list(enumerate(cases))
while todo or running:
    while todo and len(running) < par:
        i, c = todo.pop(0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(c)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        running[pid] = i
    pid, status = os.wait()
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([results[i] for i in range(len(cases))], sys.stdout)
