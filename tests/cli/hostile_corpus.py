"""A corpus of hostile ``guestmem`` command lines, and a runner that measures how each one ends.

Every case is input a user can type (or a file they can point at) that cannot work.  The promise
under test: each one exits 2 with exactly one line on stderr that says what to do, in bounded time
and memory -- no traceback, no hang, no runaway allocation.  The cases are data so that the same
list drives the pytest file (``test_cli_hostile.py``, in-process where it can) and this module's
``main`` (every case as a subprocess under a time limit and an address-space cap), which is how the
before/after numbers in the report are made::

    python3 tests/cli/hostile_corpus.py [--timeout 20] [--as-limit 3G] [-k SUBSTRING]

Arguments may hold ``{name}`` placeholders for the files :func:`make_fixtures` creates.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Permission cases mean nothing to root (it reads and writes anyway), so they exist only for others.
ROOT = os.geteuid() == 0
UNREADABLE: tuple[str, ...] = () if ROOT else ("unreadable",)

GOOD_HEAD = """\
[scenario]
name = "t"
description = "d"
memory = "4M"
"""
GOOD_PHASE = """
[[phase]]
[[phase.step]]
op = "write"
range = "ram"
pattern = 0x11
"""


@dataclass(frozen=True)
class Case:
    """One hostile command line; ``subprocess`` marks the ones that could hang or blow up memory,
    which the tests only run in a child process with a timeout."""

    id: str
    argv: tuple[str, ...]
    subprocess: bool = False


def _wrong_type_files() -> dict[str, str]:
    """A scenario with one key's value of the wrong type, for every key the format has."""
    head = {
        "name": "1", "description": "2", "flavours": "\"snp\"", "vcpus": "\"two\"", "memory": "true",
        "memory_per_vcpu": "[1]", "timeout": "\"soon\"", "requires": "7", "slices": "3",
    }
    out: dict[str, str] = {}
    for key, bad in head.items():
        lines = [ln for ln in GOOD_HEAD.splitlines() if not ln.startswith(f"{key} =")]
        if key == "memory_per_vcpu":
            lines = [ln for ln in lines if not ln.startswith("memory =")]
        out[f"wt_scenario_{key}"] = "\n".join([*lines, f"{key} = {bad}"]) + "\n" + GOOD_PHASE
    vmm = {"backing": "1", "discard_shared": "\"yes\"", "discard_private": "0", "preallocate_private": "[]",
           "shared_backing": "true", "prefault": "2", "content": "{}", "iommu": "1.5", "slack": "true",
           "enforce_bound": "\"no\""}
    for key, bad in vmm.items():
        out[f"wt_vmm_{key}"] = GOOD_HEAD + f"[vmm]\n{key} = {bad}\n" + GOOD_PHASE
    region = {"name": "1", "gpa": "true", "size": "[1]"}
    for key, bad in region.items():
        fields = {"name": "\"r\"", "gpa": "\"4G\"", "size": "\"4M\""} | {key: bad}
        body = "".join(f"{k} = {v}\n" for k, v in fields.items())
        out[f"wt_region_{key}"] = GOOD_HEAD + "[[region]]\n" + body + GOOD_PHASE
    rng = {"within": "1", "offset": "true", "size": "[]", "gpa": "{}"}
    for key, bad in rng.items():
        fields = {"size": "\"4K\""} | {key: bad}
        body = "".join(f"{k} = {v}\n" for k, v in fields.items())
        out[f"wt_range_{key}"] = GOOD_HEAD + "[range.r]\n" + body + GOOD_PHASE
    phase = {"name": "1", "vcpus": "7", "repeat": "\"x\"", "foreach": "\"ram\"", "when": "1"}
    for key, bad in phase.items():
        tail = GOOD_PHASE.split("[[phase]]\n")[1]
        out[f"wt_phase_{key}"] = GOOD_HEAD + f"[[phase]]\n{key} = {bad}\n" + tail
    step = {"op": "1", "range": "2", "pattern": "true", "access": "3", "when": "[]"}
    for key, bad in step.items():
        fields = {"op": "\"write\"", "range": "\"ram\"", "pattern": "0x11"} | {key: bad}
        body = "".join(f"{k} = {v}\n" for k, v in fields.items())
        out[f"wt_step_{key}"] = GOOD_HEAD + "[[phase]]\n[[phase.step]]\n" + body
    conv = {"to": "1", "page_size": "2", "chunk": "true", "pages": "3", "expect": "4"}
    for key, bad in conv.items():
        fields = {"op": "\"convert\"", "range": "\"ram\"", "to": "\"private\""} | {key: bad}
        body = "".join(f"{k} = {v}\n" for k, v in fields.items())
        out[f"wt_convert_{key}"] = GOOD_HEAD + "[[phase]]\n[[phase.step]]\n" + body
    out["wt_phase_not_table"] = GOOD_HEAD + "phase = 3\n"
    out["wt_region_not_list"] = GOOD_HEAD + "region = 3\n" + GOOD_PHASE
    out["wt_step_not_list"] = GOOD_HEAD + "[[phase]]\nstep = 5\n"
    out["wt_scenario_not_table"] = "scenario = 1\n" + GOOD_PHASE
    return out


def make_fixtures(root: Path) -> dict[str, str]:
    """Create the hostile files under ``root``; returns placeholder name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {"tmp": str(root), "missing_dir": str(root / "no" / "such" / "dir")}

    def put(name: str, data: str | bytes, suffix: str = ".toml") -> None:
        p = root / f"{name}{suffix}"
        if isinstance(data, str):
            p.write_text(data, encoding="utf-8")
        else:
            p.write_bytes(data)
        paths[name] = str(p)

    fifo = root / "fifo.toml"
    if not fifo.exists():
        os.mkfifo(fifo)
    paths["fifo"] = str(fifo)
    d = root / "dir.toml"
    d.mkdir(exist_ok=True)
    paths["dir"] = str(d)
    put("empty", "")
    put("binary", bytes(range(256)) * 64)
    put("latin1", "[scenario]\nname = \"caf\xe9\"\n".encode("latin-1"))
    put("nul", "[scenario]\nname = \"a\0b\"\n")
    put("deep", "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    put("deep_tables", "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n")
    put("huge", GOOD_HEAD + "# " + "x" * (64 << 20) + "\n" + GOOD_PHASE)
    put("notoml", "this is not = = toml\n")
    put("unknown_key", GOOD_HEAD + "colour = \"red\"\n" + GOOD_PHASE)
    put("no_phase", GOOD_HEAD)
    put("region_huge_gpa", GOOD_HEAD + f"[[region]]\ngpa = {2**70}\nsize = \"4M\"\n" + GOOD_PHASE)
    put("region_huge_gpa_str", GOOD_HEAD + "[[region]]\ngpa = \"1180591620717411303424\"\nsize = \"4M\"\n"
        + GOOD_PHASE)
    put("region_huge_size", GOOD_HEAD.replace("memory = \"4M\"\n", "")
        + f"[[region]]\ngpa = 0\nsize = {2**70}\n" + GOOD_PHASE)
    put("region_huge_size_str", GOOD_HEAD + "[[region]]\ngpa = 0\nsize = \"1048576T\"\n" + GOOD_PHASE)
    put("region_top", GOOD_HEAD + "[[region]]\ngpa = \"0xFFFFFFFFFFFFF000\"\nsize = \"4M\"\n" + GOOD_PHASE)
    put("memory_huge", GOOD_HEAD.replace("\"4M\"", str(2**70)) + GOOD_PHASE)
    put("memory_1t", GOOD_HEAD.replace("\"4M\"", "\"1T\"") + GOOD_PHASE)
    put("memory_float", GOOD_HEAD.replace("\"4M\"", "\"1.5e300M\"") + GOOD_PHASE)
    put("range_huge", GOOD_HEAD + f"[range.r]\ngpa = {2**70}\nsize = {2**70}\n" + GOOD_PHASE.replace(
        "range = \"ram\"", "range = \"r\""))
    put("range_huge_offset", GOOD_HEAD + f"[range.r]\noffset = {2**70}\nsize = \"4K\"\n"
        + GOOD_PHASE.replace("range = \"ram\"", "range = \"r\""))
    put("timeout_inf", GOOD_HEAD + "timeout = inf\n" + GOOD_PHASE)
    put("timeout_nan", GOOD_HEAD + "timeout = nan\n" + GOOD_PHASE)
    put("timeout_huge", GOOD_HEAD + "timeout = 1e308\n" + GOOD_PHASE)
    put("pattern_huge", GOOD_HEAD + GOOD_PHASE.replace("0x11", "\"" + "1*vcpu+" * 1 + "9" * 5000 + "\""))
    put("chunk_huge", GOOD_HEAD + "[[phase]]\n[[phase.step]]\nop = \"accept\"\nrange = \"ram\"\n"
        f"chunk = {2**70}\n")
    put("slack_huge", GOOD_HEAD + f"[vmm]\nslack = {2**70}\n" + GOOD_PHASE)
    put("vcpus_ids_huge", GOOD_HEAD + GOOD_PHASE.replace("[[phase]]\n", f"[[phase]]\nvcpus = [{2**70}]\n"))
    for name, text in _wrong_type_files().items():
        put(name, text)
    unreadable = root / "unreadable.toml"
    unreadable.write_text(GOOD_HEAD + GOOD_PHASE)
    unreadable.chmod(0)
    paths["unreadable"] = str(unreadable)
    ro = root / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    paths["readonly_dir"] = str(ro)
    return paths


def cases() -> list[Case]:
    """The hostile command lines (all of them must exit 2 with one line)."""
    c: list[Case] = []

    def add(id_: str, *argv: str, sub: bool = False) -> None:
        c.append(Case(id_, tuple(argv), sub))

    # global
    add("no-command")
    add("unknown-command", "frobnicate")
    add("unknown-global-flag", "--frob", "caps")
    add("device-empty", "--device", "", "caps")
    add("device-null-caps", "--device", "/dev/null", "caps")
    add("device-zero-caps", "--device", "/dev/zero", "caps", sub=True)
    add("device-dir-caps", "--device", "/", "caps")
    add("device-missing-caps", "--device", "/nonexistent", "caps")
    add("device-missing-caps-json", "--device", "/nonexistent", "caps", "--json")
    add("device-regular-file-caps", "--device", "{empty}", "caps")
    add("device-fifo-caps", "--device", "{fifo}", "caps", sub=True)
    add("device-null-demo", "--device", "/dev/null", "demo", "--kernel-only")
    add("device-missing-demo", "--device", "/nonexistent", "demo")
    add("device-missing-demo-kernel-only", "--device", "/nonexistent", "demo", "--kernel-only")
    add("device-null-run-kernel", "--device", "/dev/null", "run", "balloon", "--backend", "kernel")
    add("device-missing-run-kernel", "--device", "/nonexistent", "run", "balloon", "--backend", "kernel")
    add("device-tty-caps", "--device", "/dev/tty", "caps", sub=True)
    # demo
    for v in ("2**64", str(2**64), "0", "-4", "5", "4M", "abc", "", "1e3", "4.0", "nan", str(2**70 // 4 * 4),
              "1048576"):
        add(f"demo-size-{v or 'empty'}", "demo", "--kernel-only", "--size", v, sub=v in ("1048576",))
    add("demo-unknown-flag", "demo", "--frob")
    # run / map: scenario names and files
    for cmd in ("run", "map"):
        add(f"{cmd}-unknown-name", cmd, "no-such-scenario")
        add(f"{cmd}-name-with-slash", cmd, "a/b")
        add(f"{cmd}-missing-file", cmd, "/nonexistent/x.toml")
        add(f"{cmd}-fifo", cmd, "{fifo}", sub=True)
        add(f"{cmd}-dev-zero", cmd, "/dev/zero", sub=True)
        add(f"{cmd}-dev-null", cmd, "/dev/null")
        add(f"{cmd}-dev-urandom", cmd, "/dev/urandom", sub=True)
        add(f"{cmd}-proc-kmsg", cmd, "/proc/self/fd/0", sub=True)
        add(f"{cmd}-directory", cmd, "{dir}")
        add(f"{cmd}-dot", cmd, ".")
        add(f"{cmd}-empty-arg", cmd, "")
        add(f"{cmd}-deep-arrays", cmd, "{deep}", sub=True)
        add(f"{cmd}-deep-tables", cmd, "{deep_tables}", sub=True)
        add(f"{cmd}-huge-file", cmd, "{huge}", sub=True)
        for name in ("empty", "binary", "latin1", "nul", "notoml", "unknown_key", "no_phase", *UNREADABLE):
            add(f"{cmd}-{name}", cmd, "{" + name + "}")
    for name in ("region_huge_gpa", "region_huge_gpa_str", "region_huge_size", "region_huge_size_str",
                 "region_top", "memory_huge", "memory_1t", "memory_float", "range_huge", "range_huge_offset",
                 "timeout_inf", "timeout_nan", "timeout_huge", "pattern_huge", "chunk_huge", "slack_huge",
                 "vcpus_ids_huge"):
        add(f"run-{name}", "run", "{" + name + "}", sub=name in ("memory_1t", "timeout_inf", "timeout_huge"))
    for name in _wrong_type_files():
        add(f"run-{name}", "run", "{" + name + "}")
    add("run-no-scenario", "run")
    add("map-no-scenario", "map")
    add("run-list-and-name", "run", "--list", "boot")
    # run options
    for v in ("inf", "-inf", "nan", "1e308", "0", "-1", "abc", "", "1e-320", "1e30"):
        add(f"run-timeout-{v or 'empty'}", "run", "balloon", "--timeout", v,
            sub=v in ("inf", "1e308", "1e30"))
    for v in ("0", "-1", "257", "abc", "", str(2**70), "1.5"):
        add(f"run-vcpus-{v or 'empty'}", "run", "balloon", "--vcpus", v)
    for v in ("0", "-1M", "1", "3M", "abc", "", "50%", "rest", str(2**70), "2**70", "1e300M", "1T", "1.5T",
              "nan", "inf", "1P", "0x", "4Xi", "99999999999999999999999T"):
        add(f"run-memory-{v or 'empty'}", "run", "balloon", "--memory", v, sub=v in ("1T", "1.5T"))
    add("map-memory-1T", "map", "boot", "--memory", "1T", sub=True)
    add("run-boot-1T", "run", "boot", "--memory", "1T", sub=True)
    add("run-boot-512G", "run", "boot", "--memory", "512G", sub=True)
    add("run-max-resident-tiny", "run", "boot", "--max-resident", "1M")
    add("run-max-resident-garbage", "run", "boot", "--max-resident", "lots")
    add("run-max-resident-zero", "run", "boot", "--max-resident", "0")
    add("run-backend-bad", "run", "balloon", "--backend", "qemu")
    add("run-flavour-bad", "run", "balloon", "--flavour", "sgx")
    add("run-flavour-not-in-scenario", "run", "boot", "--flavour", "default")
    add("run-cpu-bad", "run", "balloon", "--cpu", "arm")
    add("run-cpu-ops-for-image", "run", "c-guest-snp", "--cpu", "ops")
    add("run-trace-dev-null", "run", "balloon", "--trace", "/dev/null")
    add("map-png-fifo", "map", "balloon", "--png", "{fifo}")
    add("run-trace-missing-dir", "run", "balloon", "--trace", "{missing_dir}/t.json")
    add("run-trace-is-dir", "run", "balloon", "--trace", "{tmp}")
    if not ROOT:
        add("run-trace-readonly-dir", "run", "balloon", "--trace", "{readonly_dir}/t.json")
    add("run-trace-empty", "run", "balloon", "--trace", "")
    add("run-trace-dev-full", "run", "balloon", "--trace", "/dev/full")
    add("map-png-missing-dir", "map", "balloon", "--png", "{missing_dir}/m.png")
    add("map-svg-is-dir", "map", "balloon", "--svg", "{tmp}")
    if not ROOT:
        add("map-png-readonly", "map", "balloon", "--png", "{readonly_dir}/m.png")
    add("map-png-svg-same", "map", "balloon", "--png", "{tmp}/same", "--svg", "{tmp}/same")
    add("run-unknown-flag", "run", "balloon", "--frob")
    # figures and the HTML report
    for v in ("", "x", "12", "12x", "x7", "0x5", "5x0", "101x5", "nanx3", "infxinf", "-3x4", "1e308x2",
              "3x4x5"):
        add(f"map-size-{v or 'empty'}", "map", "balloon", "--size", v)
    for v in ("", "0", "29", "1201", "abc", "1.5", str(2**70)):
        add(f"map-dpi-{v or 'empty'}", "map", "balloon", "--dpi", v)
    add("map-size-dpi-too-many-pixels", "map", "balloon", "--size", "100x100", "--dpi", "1200", "--png",
        "{tmp}/big.png")
    add("map-format-bad", "map", "balloon", "--format", "gif", "-o", "{tmp}/m")
    add("map-output-no-extension", "map", "balloon", "-o", "{tmp}/m")
    add("map-output-dev-null", "map", "balloon", "-o", "/dev/null")
    add("map-pdf-is-dir", "map", "balloon", "--pdf", "{tmp}")
    add("map-png-output-same", "map", "balloon", "--png", "{tmp}/same.png", "-o", "{tmp}/same.png")
    add("report-no-output", "report", "balloon")
    add("report-no-scenario", "report", "-o", "{tmp}/r.html")
    add("report-output-missing-dir", "report", "balloon", "-o", "{missing_dir}/r.html")
    add("report-output-fifo", "report", "balloon", "-o", "{fifo}")
    add("report-memory-1T", "report", "boot", "--memory", "1T", "-o", "{tmp}/r.html", sub=True)
    add("run-html-is-dir", "run", "balloon", "--html", "{tmp}")
    add("run-html-trace-same", "run", "balloon", "--html", "{tmp}/same", "--trace", "{tmp}/same")
    add("compare-svg-pdf-same", "compare", "--svg", "{tmp}/c", "--pdf", "{tmp}/c")
    add("compare-size-bad", "compare", "--size", "wide")
    add("compare-dpi-bad", "compare", "--dpi", "5000")
    # compare
    for v in (str(2**70), "1048576", "0", "-2", "17", "abc", "", "nan", "16"):
        add(f"compare-ram-{v or 'empty'}", "compare", "--ram", v, sub=v in ("1048576",))
    for v in ("0", "65", "-1", "x", str(2**70)):
        add(f"compare-rounds-{v}", "compare", "--rounds", v)
    add("compare-workload-bad", "compare", "nope")
    add("compare-flavour-bad", "compare", "--flavour", "tdx")
    add("compare-png-missing-dir", "compare", "--png", "{missing_dir}/c.png")
    add("compare-png-is-dir", "compare", "--png", "{tmp}")
    if not ROOT:
        add("compare-png-readonly", "compare", "--png", "{readonly_dir}/c.png")
    # bench
    add("bench-output-missing-dir", "bench", "--quick", "-o", "{missing_dir}/b.json", sub=True)
    add("bench-output-is-dir", "bench", "--quick", "-o", "{tmp}", sub=True)
    if not ROOT:
        add("bench-output-readonly", "bench", "--quick", "-o", "{readonly_dir}/b.json", sub=True)
    add("bench-output-empty", "bench", "--quick", "-o", "", sub=True)
    add("bench-unknown-flag", "bench", "--frob")
    # caps
    add("caps-unknown-flag", "caps", "--frob")
    # the options added for issue 12 and the fuzzer
    for v in ("bogus=1", "tdp_mmu=maybe", "noequals", "gmem_folio_order=3", "phys_bits=99",
              "vm_types=nope", "=", "attributes=vm"):
        add(f"run-model-{v}", "run", "inplace-hugepage", "--model", v)
    for v in ("17M", "0", str(2**70), "1T", "x"):
        add(f"compare-memory-{v}", "compare", "--memory", v, sub=v == "1T")
    for v in ("5M", "0", str(2**70), "x"):
        add(f"demo-memory-{v}", "demo", "--memory", v)
    for opt, v in (("--sequences", "-5"), ("--max-steps", "0"), ("--shrink-seconds", "nan"),
                   ("--minutes", "inf"), ("--seed", "-1"), ("--findings", "{missing_dir}/f.md"),
                   ("--backend", "neither")):
        add(f"fuzz{opt}-{v}", "fuzz", opt, v)
    add("caps-device-after", "caps", "--device", "/nonexistent")
    return c


def expand(argv: tuple[str, ...], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) if "{" in a and "}" in a and not a.startswith("{{") else a for a in argv]


@dataclass
class Outcome:
    case: Case
    rc: int | None  # None: killed by the timeout
    err_lines: list[str]
    seconds: float
    max_rss_kib: int

    @property
    def verdict(self) -> str:
        """clean | traceback | hang | memory | wrong-exit | multi-line."""
        if self.rc is None:
            return "hang"
        text = "\n".join(self.err_lines)
        if "MemoryError" in text or self.rc in (-9, 137) or self.max_rss_kib > 3 << 20:
            return "memory"
        if "Traceback" in text:
            return "traceback"
        if self.rc != 2:
            return "wrong-exit"
        if len(self.err_lines) != 1:
            return "multi-line"
        return "clean"


def run_one(case: Case, paths: dict[str, str], *, timeout: float, as_limit: int, cwd: str) -> Outcome:
    """Run one case as ``python3 -m guestmem.cli`` in ``cwd`` under ``timeout`` and RLIMIT_AS; the
    child's own peak RSS comes from ``wait4``."""
    import tempfile

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    argv = [sys.executable, "-m", "guestmem.cli", *expand(case.argv, paths)]
    start = time.monotonic()
    with tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err_f, preexec_fn=limit, env={**os.environ, "COLUMNS": "120"})
        rc: int | None = None
        rss = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                rss = usage.ru_maxrss
                proc.returncode = rc
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                rss = usage.ru_maxrss
                break
            time.sleep(0.02)
        seconds = time.monotonic() - start
        err_f.seek(0)
        err = err_f.read().decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return Outcome(case, rc, lines, seconds, rss)


def batch(argvs: list[list[str]], *, timeout: int, as_limit: int) -> list[dict[str, object]]:
    """Run ``guestmem.cli.main`` on each argv in a forked child of this (already warmed-up)
    process: each child gets ``RLIMIT_AS`` and ``alarm(timeout)`` (a hang dies of SIGALRM), its
    stderr goes to a file, and ``wait4`` gives its peak RSS.  Fast (no interpreter start per case)
    and isolated (a case that hangs or blows up takes only its own child down)."""
    import signal
    import tempfile

    import guestmem.linux.caps
    import guestmem.scenarios.run  # noqa: F401  (warm: what the commands import lazily)
    from guestmem.cli import build_parser
    from guestmem.cli import main as cli_main

    build_parser()  # imports every subcommand's module once, here, not in each child
    out: list[dict[str, object]] = []
    for argv in argvs:
        with tempfile.TemporaryFile() as err_f:
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 70
                try:
                    os.dup2(err_f.fileno(), 2)
                    devnull = os.open(os.devnull, os.O_RDWR)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 0)
                    resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
                    signal.alarm(timeout)
                    code = cli_main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 2
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            _, status, usage = os.wait4(pid, 0)
            seconds = time.monotonic() - start
            err_f.seek(0)
            err = err_f.read().decode("utf-8", "replace")
        rc = os.waitstatus_to_exitcode(status)
        out.append({"argv": argv, "rc": None if rc == -signal.SIGALRM else rc,
                    "err_lines": [ln for ln in err.splitlines() if ln.strip()], "seconds": seconds,
                    "max_rss_kib": usage.ru_maxrss})
    return out


def main(argv: list[str] | None = None) -> int:
    import json
    import tempfile

    if argv is None and sys.argv[1:2] == ["--batch"]:  # python3 hostile_corpus.py --batch T AS < argvs.json
        sys.path.insert(0, os.getcwd())
        result = batch(json.load(sys.stdin), timeout=int(sys.argv[2]), as_limit=int(sys.argv[3]))
        json.dump(result, sys.stdout)
        return 0

    ap = argparse.ArgumentParser(description="run the hostile CLI corpus as subprocesses")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--as-limit", default=str(3 << 30), help="RLIMIT_AS in bytes")
    ap.add_argument("-k", default="", help="only cases whose id contains this")
    ap.add_argument("--cwd", default=str(Path(__file__).resolve().parents[2]))
    ns = ap.parse_args(argv)
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="guestmem-hostile-") as tmp:
        paths = make_fixtures(Path(tmp))
        try:
            for case in cases():
                if ns.k and ns.k not in case.id:
                    continue
                o = run_one(case, paths, timeout=ns.timeout, as_limit=int(ns.as_limit), cwd=ns.cwd)
                counts[o.verdict] = counts.get(o.verdict, 0) + 1
                first = o.err_lines[-1] if o.verdict == "traceback" and o.err_lines else (
                    o.err_lines[0] if o.err_lines else "")
                print(f"{o.verdict:10} rc={o.rc!s:4} {o.seconds:6.2f}s {o.max_rss_kib >> 10:5}M "
                      f"{len(o.err_lines):3}l "
                      f"{case.id:40} {first[:150]}", flush=True)
        finally:
            Path(paths["readonly_dir"]).chmod(0o755)
    print("totals:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), f"of {sum(counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
