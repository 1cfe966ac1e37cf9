"""README.md and docs/ stay true: every relative link reaches a file (and its #heading), and
every command they show runs a program that exists, with flags that program defines.

The flags come from the programs' own definitions: train.py's and evaluate.py's absl flags as
those files define them (one subprocess each, which imports no TensorFlow); for the
`python -m dc_tf.…` tools and `python benchmarks/….py`, the DEFINE_* and add_argument calls of
their source (they define flags under `__main__`, after importing TensorFlow, so only their
source is read); and Beam's pipeline options for make_shards, which hands the flags it does not
define to Beam (`known_only=True`).
"""

import ast
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

DOCS = ["README.md", "benchmarks/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# absl handles these itself (--flagfile, --undefok) or app.run defines them at start-up (help).
ABSL_BUILTIN = {"flagfile": True, "undefok": True, "help": False, "helpfull": False,
                "helpshort": False, "helpxml": False}
SHELL_OPERATOR = re.compile(r"^[;&|<>()]+$")
# Flags of facebookresearch/DeeperCluster's main.py that the docs name, as the original's.
ORIGINAL_FLAGS = {"pretrained": True}
RUNS_PYTHON = re.compile(r"(?:^|[\s/;&|(])python3?\s+(?:-m\s+dc_tf\b|\S+\.py\b)")


# ------------------------------------------------------------------------------- markdown

def read_markdown(doc):
  """(fenced blocks as (first line number, language, lines), prose lines with code blanked)."""
  blocks, prose, block = [], [], None
  with open(os.path.join(REPO, doc), encoding="utf-8") as f:
    lines = f.read().splitlines()
  for n, line in enumerate(lines, 1):
    if line.lstrip().startswith(("```", "~~~")):
      if block is None:
        block = (n + 1, line.strip()[3:].strip().lower(), [])
      else:
        blocks.append(block)
        block = None
      prose.append("")
    elif block is not None:
      block[2].append(line)
      prose.append("")
    else:
      prose.append(line)
  return blocks, prose


def inline_code(prose):
  """(line number, text) of each `code span` of the prose (a span may wrap onto the next line)."""
  text = "\n".join(prose)
  for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
    if "\n\n" not in m.group(1):
      yield text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")


def github_slug(heading):
  """The anchor GitHub gives a heading: lower case, punctuation and symbols dropped, spaces to -."""
  s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  s = re.sub(r"<[^>]+>", "", s).strip().lower()
  return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def anchors(path):
  seen, out = {}, set()
  _, prose = read_markdown(os.path.relpath(path, REPO))
  for line in prose:
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      slug = github_slug(m.group(1))
      out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
      seen[slug] = seen.get(slug, 0) + 1
  return out


def links(doc):
  """(line number, target) of each markdown link and image outside code."""
  _, prose = read_markdown(doc)
  text = re.sub(r"(?<!`)`[^`]+`(?!`)", lambda m: re.sub(r"[^\n]", " ", m.group()), "\n".join(prose))
  for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
    yield text.count("\n", 0, m.start()) + 1, m.group(1)
  for m in re.finditer(r"^\s*\[[^\]]+\]:\s*(\S+)", text, re.M):
    yield text.count("\n", 0, m.start()) + 1, m.group(1)


def link_error(doc, target):
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):      # https:, mailto: ...
    return None
  path, _, anchor = target.partition("#")
  dest = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else \
      os.path.join(REPO, doc)
  if not dest.startswith(REPO + os.sep):
    return f"{target}: outside the repository"
  if not os.path.exists(dest):
    return f"{target}: no such file ({os.path.relpath(dest, REPO)})"
  if anchor:
    if not dest.endswith(".md"):
      return f"{target}: an anchor into a file that is not markdown"
    if anchor not in anchors(dest):
      return f"{target}: no heading with the anchor #{anchor} in {os.path.relpath(dest, REPO)}"
  return None


# ------------------------------------------------------------------------------- programs

@dataclasses.dataclass
class Program:
  """The flags one program accepts: name -> whether it takes a value."""
  name: str
  flags: dict
  absl: bool = True
  passthrough: dict = None    # flags handed on (make_shards: Beam's pipeline options)

  def takes_value(self, name):
    """True / False for a flag, None when the program does not define it."""
    if name in self.flags:
      return self.flags[name]
    if self.absl and name.startswith("no") and self.flags.get(name[2:]) is False:
      return False    # absl's --noflag for a boolean
    if self.passthrough and name in self.passthrough:
      return self.passthrough[name]
    return None


_ABSL_DUMP = r"""
import importlib.util, json, sys
from absl import flags
spec = importlib.util.spec_from_file_location("_program", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
F = flags.FLAGS
print(json.dumps({"flags": {n: not F[n].boolean for n in F},
                  "absl": sorted(n for m, fl in F.flags_by_module_dict().items()
                                 if m.startswith("absl") for f in fl
                                 for n in (f.name, f.short_name) if n)}))
"""
_BEAM_DUMP = r"""
import argparse, json, logging
logging.disable(logging.WARNING)
from apache_beam.options import pipeline_options as po
parser, todo, seen = argparse.ArgumentParser(conflict_handler="resolve"), [po.PipelineOptions], set()
while todo:
  cls = todo.pop()
  if cls not in seen:
    seen.add(cls)
    cls._add_argparse_args(parser)
    todo.extend(cls.__subclasses__())
print(json.dumps({o.lstrip("-"): a.nargs != 0 for a in parser._actions for o in a.option_strings}))
"""


@pytest.fixture(scope="module")
def programs():
  """Every program the docs may run, by the name a command gives it."""
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = {name: subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, code, args in [("train.py", _ABSL_DUMP, ["train.py"]),
                                    ("evaluate.py", _ABSL_DUMP, ["evaluate.py"]),
                                    ("beam", _BEAM_DUMP, [])]}
  dumps = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{name}: {err[-2000:]}"
    dumps[name] = json.loads(out.strip().splitlines()[-1])
  absl_builtin = dict(ABSL_BUILTIN, **{n: dumps["train.py"]["flags"][n]
                                       for n in dumps["train.py"]["absl"]})
  out = {name: Program(name, dict(ABSL_BUILTIN, **dumps[name]["flags"]))
         for name in ("train.py", "evaluate.py")}
  sources = glob.glob(os.path.join(REPO, "dc_tf", "**", "*.py"), recursive=True) + \
      glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
  for path in sources:
    rel = os.path.relpath(path, REPO)
    if rel.startswith("dc_tf"):
      module = rel[:-3].replace(os.sep, ".")
      name = module[:-len(".__main__")] if module.endswith(".__main__") else module
    else:
      name = rel
    out[name] = source_program(name, path, absl_builtin, dumps["beam"])
  return out


def const(node):
  return node.value if isinstance(node, ast.Constant) else None


def source_program(name, path, absl_builtin, beam):
  """A program's flags from the DEFINE_* / add_argument calls in its source."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  flags, absl = {}, False
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    kw = {k.arg: k.value for k in node.keywords}
    if node.func.attr.startswith("DEFINE_"):
      absl = True
      first = const(node.args[0]) if node.args else const(kw.get("name"))
      if isinstance(first, str):
        if node.func.attr == "DEFINE_alias":
          flags[first] = flags.get(const(node.args[1]) if len(node.args) > 1 else None, True)
        else:
          flags[first] = node.func.attr not in ("DEFINE_bool", "DEFINE_boolean")
          if isinstance(const(kw.get("short_name")), str):
            flags[const(kw["short_name"])] = flags[first]
    elif node.func.attr == "add_argument":
      takes = const(kw.get("action")) not in ("store_true", "store_false", "store_const",
                                               "count", "help", "version")
      for arg in node.args:
        if isinstance(const(arg), str) and const(arg).startswith("-"):
          flags[const(arg).lstrip("-")] = takes
  if absl:
    flags = dict(absl_builtin, **flags)
  elif "ArgumentParser(" in source:
    flags["help"] = False
  return Program(name, flags, absl=absl, passthrough=beam if "known_only=True" in source else None)


# ------------------------------------------------------------------------------- commands

def commands(doc):
  """(line number, text) of each shell command of the doc that runs python: fenced (but not
  python-code) blocks, continuation lines joined, and inline code spans."""
  blocks, prose = read_markdown(doc)
  for start, lang, lines in blocks:
    if lang in ("python", "py", "json", "yaml"):
      continue
    pending, first = "", None
    for n, line in enumerate(lines, start):
      first = n if first is None else first
      if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
      yield first, pending + line
      pending, first = "", None
  for n, span in inline_code(prose):
    yield n, span


def shell_tokens(command):
  command = re.sub(r"\$\([^()]*\)", "X", command)      # --classes=$(paste -sd, data/classes.txt)
  command = re.sub(r"<[^<>\s][^<>]*>", "X", command)   # --sobel=<as printed>
  lex = shlex.shlex(command, posix=True, punctuation_chars=";&|<>()")
  lex.whitespace_split = True
  lex.commenters = "#"
  return list(lex)


def invocations(command):
  """(program name, args) of each python program the command runs (TF_CONFIG=... prefixes,
  srun and pipes allowed); `python -m` of modules outside dc_tf is left out."""
  segment = []
  for token in shell_tokens(command) + [";"]:
    if not SHELL_OPERATOR.match(token):
      segment.append(token)
      continue
    for i, t in enumerate(segment):
      if t in ("python", "python3") or t.endswith(("/python", "/python3")):
        rest = segment[i + 1:]
        if rest[:1] == ["-m"] and len(rest) > 1 and rest[1].split(".")[0] == "dc_tf":
          yield rest[1], rest[2:]
        elif rest and rest[0].endswith(".py"):
          yield os.path.normpath(rest[0]), rest[1:]
        break
    segment = []


def flag_errors(program, args, where):
  errors, skip_value = [], False
  for token in args:
    if skip_value:
      skip_value = False
      continue
    token = token.strip("[]")               # [--onnx]: optional, in the docs' notation
    if not token.startswith("-") or token.strip("-") in ("", "...", "…"):
      continue                              # a positional argument, or `...`
    if not program.absl and not token.startswith("--") and token not in ("-h",):
      errors.append(f"{where}: {program.name} has no short option {token}")
      continue
    name, eq, value = token.lstrip("-").partition("=")
    takes = program.takes_value(name)
    if takes is None:
      errors.append(f"{where}: --{name} is not a flag of {program.name}")
      continue
    skip_value = takes and not eq
    if program.absl and name == "flagfile" and eq:
      errors += flagfile_errors(program, value, where)
  return errors


def flagfile_errors(program, path, where):
  full = os.path.join(REPO, path)
  if not os.path.isfile(full):
    return [f"{where}: --flagfile={path}: no such file"]
  with open(full, encoding="utf-8") as f:
    lines = [l.strip() for l in f]
  return flag_errors(program, [l for l in lines if l and not l.startswith(("#", "//"))],
                     f"{where} ({path})")


def command_errors(doc, programs):
  errors = []
  for n, command in commands(doc):
    if not RUNS_PYTHON.search(command):
      continue
    where = f"{doc}:{n}"
    try:
      runs = list(invocations(command))
    except ValueError as e:                # unbalanced quotes
      errors.append(f"{where}: cannot split {command!r}: {e}")
      continue
    for name, args in runs:
      if name not in programs:
        errors.append(f"{where}: {name}: no such program")
      else:
        errors += flag_errors(programs[name], args, where)
  return errors + manifest_errors(doc, programs)


def manifest_errors(doc, programs):
  """Job manifests (yaml blocks: Kubeflow's TFJob, Vertex AI) that run `python train.py` pass
  its flags as list items: each `--flag` in the block must be one of train.py's."""
  errors = []
  for start, lang, lines in read_markdown(doc)[0]:
    text = "\n".join(lines)
    if lang not in ("yaml", "yml") or not re.search(r"\bpython3?\b", text):
      continue
    for name in ("train.py", "evaluate.py"):
      if not re.search(rf"(?<![\w/.]){re.escape(name)}\b", text):
        continue
      for n, line in enumerate(lines, start):
        line = "" if line.lstrip().startswith("#") else line.split(" #")[0]   # yaml comments
        args = re.findall(r"(?<![\w-])--[A-Za-z][\w-]*(?:=[^\s,\]]*)?", line)
        errors += flag_errors(programs[name], args, f"{doc}:{n}")
  return errors


# ------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
  errors = [f"{doc}:{n}: {e}" for n, target in links(doc) if (e := link_error(doc, target))]
  assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_names_a_real_program_and_its_real_flags(doc, programs):
  errors = command_errors(doc, programs)
  assert not errors, "\n".join(errors)


def prose_flag_errors(doc, programs):
  """A `--flag` named in prose (an inline code span that runs no python program) must be a flag
  of the program the span starts with (`train.py --plan`, `make_shards --source=yfcc`), or of
  one of the programs when the span starts with the flag. Spans that start with another tool
  (`tensorboard --logdir`) are left alone."""
  union = Program("any program", dict(ORIGINAL_FLAGS), passthrough={})
  by_short_name = {}
  for name, program in programs.items():
    union.flags.update(program.flags)
    union.passthrough.update(program.passthrough or {})
    by_short_name[name.split(".")[-1] if name.startswith("dc_tf") else os.path.basename(name)] = name
  errors = []
  _, prose = read_markdown(doc)
  for n, span in inline_code(prose):
    words = span.split()
    if not words or RUNS_PYTHON.search(span):
      continue                          # checked against its own program by the test above
    if words[0].startswith("--"):
      program = union
    else:
      program = programs.get(words[0]) or programs.get(by_short_name.get(words[0]))
      if program is None:
        continue
    for token in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span):
      name = token[2:]
      if "-" in name:    # ours and Beam's are snake_case: --gpus-per-node is sbatch's
        if program.takes_value(name.replace("-", "_")) is not None:
          errors.append(f"{doc}:{n}: {token}: the flag is --{name.replace('-', '_')}")
      elif program.takes_value(name) is None:
        errors.append(f"{doc}:{n}: {token} is not a flag of {program.name}")
  return errors


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_named_in_prose_exists(doc, programs):
  errors = prose_flag_errors(doc, programs)
  assert not errors, "\n".join(errors)


def test_the_command_check_catches_what_it_should(programs, tmp_path, monkeypatch):
  """A wrong flag, --noflag of a non-boolean, a wrong program, a bad flagfile line, a wrong flag
  in a job manifest or in prose, and a dead link fail; absl's --noflag, `--flag value`, env
  prefixes, continuations, comments and other tools' flags pass."""
  monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
  (tmp_path / "flags").mkdir()
  (tmp_path / "flags" / "x.cfg").write_text("# a preset\n--epochs=2\n--no_such_preset_flag=1\n")
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.md").write_text("# A heading, `code` and all\n")
  (tmp_path / "README.md").write_text(
      "See [a](docs/a.md#a-heading-code-and-all), [b](docs/b.md), [c](docs/a.md#nothing).\n\n"
      "```bash\n"
      "TF_CONFIG='{\"task\": {}}' python train.py --nosobel --mode rotnet \\\n"
      "    --epochs=3 --flagfile=flags/x.cfg   # a comment's apostrophe\n"
      "python train.py --no_such_flag=1 && python evaluate.py --noprobe_epochs\n"
      "python -m dc_tf.no_such_module --x=1; python -m pytest -q tests\n"
      "python benchmarks/kmeans.py --quick --kwik\n"
      "```\n\n"
      "```yaml\n"
      "command: [python, train.py]   # --not_a_flag in a comment is not read\n"
      "args: [--epochs=2, --yaml_typo=1]\n"
      "```\n\n"
      "Prose: `--nosobel`, `train.py --kmeans_iter=3`, `--mixed-precision`, `tensorboard --logdir x`.\n")
  errors = command_errors("README.md", programs)
  assert errors == [
      "README.md:4 (flags/x.cfg): --no_such_preset_flag is not a flag of train.py",
      "README.md:6: --no_such_flag is not a flag of train.py",
      "README.md:6: --noprobe_epochs is not a flag of evaluate.py",
      "README.md:7: dc_tf.no_such_module: no such program",
      "README.md:8: --kwik is not a flag of benchmarks/kmeans.py",
      "README.md:13: --yaml_typo is not a flag of train.py"], errors
  errors = prose_flag_errors("README.md", programs)
  assert errors == ["README.md:16: --kmeans_iter is not a flag of train.py",
                    "README.md:16: --mixed-precision: the flag is --mixed_precision"], errors
  dead = [e for _, t in links("README.md") if (e := link_error("README.md", t))]
  assert dead == ["docs/b.md: no such file (docs/b.md)",
                  "docs/a.md#nothing: no heading with the anchor #nothing in docs/a.md"], dead


def test_readme_is_a_map_and_keeps_the_newcomer_commands():
  """The front page stays short, and shows exactly the install, train and test commands that
  .ci/run runs."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert readme.count("\n") <= 200
  blocks = [line for _, _, lines in read_markdown("README.md")[0] for line in lines]
  assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
          "python train.py") in blocks
  # the tests: one command that sets up what they need (.ci/run itself), then the inner loop
  # that .ci/run ends with
  assert "bash .ci/run" in blocks and "python -m pytest -q tests" in blocks
  assert blocks.index("bash .ci/run") < blocks.index("python -m pytest -q tests")
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert "\npython -m pytest -q tests\n" in ci
  assert "-r requirements.txt" in ci and "-r requirements-test.txt" in ci and "chromium" in ci
