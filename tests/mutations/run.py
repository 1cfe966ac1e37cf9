"""Planted bugs: each patch here must make the tests it names fail (issue 29, item 1).

  python tests/mutations/run.py                 # every patch
  python tests/mutations/run.py 07 13           # the patches whose names start so
  python tests/mutations/run.py --was=5d22063   # also run each patch's "Was:" tests, as
                                                # they were at that commit, on the bug
  python tests/mutations/run.py --head=dc_tf/x.py   # x.py as committed (a change in
                                                    # progress in the working tree)

Run by hand, not by CI (it is not named test_*, so pytest does not collect it). For each
patch: the working tree (tracked files and untracked ones git does not ignore; no .git, no
caches) is copied into a temporary folder, the patch applied there with `patch -p1`, and its
"Kills:" tests run with pytest in that copy: "killed" when they fail, "survived" when they
pass. First, the same tests run on the unpatched copy, which must pass. Nothing in the
working tree is touched.

A patch names its tests in its preamble, before the diff (patch ignores those lines):
  Kills: tests/test_plan.py::test_x tests/test_plan.py::test_y
  Was: tests/test_plan.py::test_old_name     (optional: the weak check it replaces)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def read_patch(path: str) -> dict:
  kills, was = [], []
  with open(path) as f:
    for line in f:
      if line.startswith("--- "):
        break
      if line.startswith("Kills:"):
        kills += line.split()[1:]
      elif line.startswith("Was:"):
        was += line.split()[1:]
  return {"name": os.path.basename(path), "path": path, "kills": kills, "was": was}


def working_tree_files() -> list[str]:
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                       capture_output=True, check=True).stdout.decode()
  return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def copy_tree(files: list[str], dest: str) -> None:
  for f in files:
    os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
    shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))


def pytest(copy: str, tests: list[str], timeout: int) -> tuple[int, float, str]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1")
  start = time.time()
  try:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", *tests], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=timeout)
    rc, out = p.returncode, p.stdout + p.stderr
  except subprocess.TimeoutExpired:
    rc, out = -1, "timed out"
  return rc, time.time() - start, out


def failure_lines(out: str) -> str:
  """pytest's assertion lines ('>' and 'E ') and the summary, for --show."""
  keep = [l for l in out.splitlines() if l.startswith((">", "E ", "FAILED", "ERROR"))]
  return "\n".join("    | " + l for l in keep[:40])


def verdict(rc: int) -> str:
  return {0: "survived", 1: "killed"}.get(rc, f"error (pytest exit {rc})")


def failed_tests(out: str, tests: list[str]) -> str:
  """Which of `tests` failed, from pytest's short summary ("FAILED nodeid - message")."""
  failed = [l.split()[1] for l in out.splitlines() if l.startswith(("FAILED ", "ERROR "))]
  names = [t for t in tests if any(f == t or f.startswith(t + "[") for f in failed)]
  return f"{len(names)} of {len(tests)} fail: " + ", ".join(t.split("::")[-1] for t in names)


def last_failure(out: str) -> str:
  """The first failing test and its message, from pytest's short summary."""
  lines = out.strip().splitlines()
  summary = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
  return (summary or lines or [""])[0][:200]


def old_tests(copy: str, rev: str, tests: list[str]) -> None:
  """Replaces the files of `tests` (or plain paths) in the copy by their versions at `rev`."""
  for path in {t.split("::")[0] for t in tests}:
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True,
                          check=True).stdout
    with open(os.path.join(copy, path), "wb") as f:
      f.write(text)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("only", nargs="*", help="run the patches whose names start with these")
  parser.add_argument("--was", default="", help="a commit: also run the Was: tests at it")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
  parser.add_argument("--show", action="store_true", help="print each run's pytest output tail")
  parser.add_argument("--head", action="append", default=[], metavar="PATH",
                      help="take PATH as committed at HEAD, not the working tree's (another "
                           "change in progress there)")
  args = parser.parse_args()
  patches = [read_patch(os.path.join(HERE, p)) for p in sorted(os.listdir(HERE))
             if p.endswith(".patch") and (not args.only or p.startswith(tuple(args.only)))]
  files = working_tree_files()
  results = []
  with tempfile.TemporaryDirectory(prefix="dc_tf_mutations_") as tmp:
    pristine = os.path.join(tmp, "pristine")
    copy_tree(files, pristine)
    for path in args.head:
      old_tests(pristine, "HEAD", [path])
    baseline = sorted({t for p in patches for t in p["kills"]})
    base_rc, seconds, out = pytest(pristine, baseline, args.timeout)
    print(f"unpatched: {len(baseline)} tests {'pass' if base_rc == 0 else 'FAIL'} "
          f"({seconds:.0f} s)" + ("" if base_rc == 0 else f": {last_failure(out)}"), flush=True)
    for p in patches:
      copy = os.path.join(tmp, p["name"])
      shutil.copytree(pristine, copy)
      applied = subprocess.run(["patch", "-p1", "--batch", "-i", p["path"]], cwd=copy,
                               capture_output=True, text=True)
      if applied.returncode:
        line = f"{p['name']}: does not apply: {applied.stdout.strip().splitlines()[-1:]}"
        print(line, flush=True)
        results.append(line)
        shutil.rmtree(copy)
        continue
      rc, seconds, out = pytest(copy, p["kills"], args.timeout)
      if args.show:
        print(failure_lines(out))
      line = f"{p['name']}: {verdict(rc)} ({seconds:.0f} s)"
      if rc == 1:
        line += f": {failed_tests(out, p['kills'])}"
      if args.was and p["was"]:
        old_tests(copy, args.was, p["was"])
        rc_old, seconds, out = pytest(copy, p["was"], args.timeout)
        if args.show:
          print(failure_lines(out))
        line += f"\n    was at {args.was}: {verdict(rc_old)} ({seconds:.0f} s)"
      print(line, flush=True)
      results.append(line)
      shutil.rmtree(copy)
  survived = [r for r in results if ": survived" in r.split("\n")[0] or "does not apply" in r]
  print(f"\n{len(results) - len(survived)} of {len(results)} killed")
  return 1 if survived or base_rc != 0 else 0


if __name__ == "__main__":
  sys.exit(main())
