"""The floor plan holds (docs/DESIGN.md; STYLE.md, Layout), read from the source with `ast`:

* imports among cai_jax's modules form no cycle, function-level imports included, and flow down
  the floors (FLOORS: entry points, pipeline, stages, shared pieces, bookkeeping, engine,
  utilities), save the one exception named in UPWARD;
* every import of a project module names a module of the tree (no old path, no alias module);
* no module in cai_jax/stages/ imports another stage: what two stages share lives below them;
* an import of a project module inside a function says why, in a comment on its line or on the
  line above it (above its group, for consecutive imports);
* every module is at most 600 lines, or its docstring has a paragraph 'Why one module ...'
  giving the reason.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'cai_jax'
MAX_LINES = 600
REASON = 'Why one module'
IMPORT = ('import ', 'from ')
# The floors, top to bottom (docs/DESIGN.md draws them). A module imports from its own floor or
# below; within the stages' floor, only itself (test_no_stage_imports_another_stage).
FLOORS = (
    ('cai_jax', 'cai_jax.main', 'cai_jax.aot', 'cai_jax.aot_programs', 'cai_jax.validate'),
    ('cai_jax.pipeline',),
    ('cai_jax.stages',),
    ('cai_jax.method', 'cai_jax.evaluation'),
    ('cai_jax.bookkeeping',),
    ('cai_jax.models', 'cai_jax.sampling', 'cai_jax.training'),
    ('cai_jax.utils',),
)
# The one import up a floor: the sampler renders and tokenizes conversations with the shared
# conversation format, a module that imports nothing of the project.
UPWARD = {
    ('cai_jax.sampling.decoding', 'cai_jax.method.conversation'),
    ('cai_jax.sampling.scoring', 'cai_jax.method.conversation'),
}


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules(pkg: Path = PKG) -> dict[str, Path]:
  """{dotted name: path} of every module of the package (packages by their __init__.py)."""
  return {module_name(p): p for p in sorted(pkg.rglob('*.py'))}


def _resolve(name: str, known) -> str | None:
  """The module `name` imports (itself, or the package holding the attribute it names)."""
  while name and name not in known:
    name = name.rpartition('.')[0]
  return name or None


def project_imports(path: Path, known) -> list[tuple[str, int, bool]]:
  """(imported cai_jax name, line, inside a function) of every import in `path` of a cai_jax
  module; the name is left as written when it names no module of the tree."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        # `from a.b import c`: module a.b.c when there is one, else a.b (c is an attribute).
        names = [f'{child.module}.{a.name}' for a in child.names]
      for n in names:
        if n == 'cai_jax' or n.startswith('cai_jax.'):
          exact = n if n in known else None
          parent = n.rpartition('.')[0] if isinstance(child, ast.ImportFrom) else n
          target = exact or (parent if parent in known else n)
          out.append((target, child.lineno, in_function))
      visit(child, inner)

  visit(ast.parse(path.read_text()), False)
  return out


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
  """Module -> the project modules it imports (a package's __init__ runs first: an edge to it)."""
  edges = {m: set() for m in mods}
  for m, path in mods.items():
    for target, _, _ in project_imports(path, mods):
      t = _resolve(target, mods)
      if t is None or t == m:
        continue
      edges[m].add(t)
      parent = t.rpartition('.')[0]
      while parent and parent != m and not m.startswith(parent + '.'):
        edges[m].add(parent)
        parent = parent.rpartition('.')[0]
  return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      strong(v)
  return out


def unexplained_function_imports(path: Path, known) -> list[int]:
  """Lines of function-level imports of project modules with no comment saying why."""
  lines = path.read_text().splitlines()
  bad = []
  for _, lineno, in_function in project_imports(path, known):
    if not in_function or '#' in lines[lineno - 1]:
      continue
    above = lineno - 2
    while above >= 0 and (not lines[above].strip() or lines[above].strip().startswith(IMPORT)):
      above -= 1  # the comment of a group of imports sits above the group
    if not (above >= 0 and lines[above].strip().startswith('#')):
      bad.append(lineno)
  return bad


def oversized(path: Path) -> bool:
  """Over MAX_LINES without a docstring paragraph that starts with REASON."""
  if len(path.read_text().splitlines()) <= MAX_LINES:
    return False
  doc = ast.get_docstring(ast.parse(path.read_text())) or ''
  return not any(p.strip().startswith(REASON) for p in doc.split('\n\n'))


def floor(module: str) -> int:
  for i, prefixes in enumerate(FLOORS):
    for p in prefixes:
      if module == p or (p != 'cai_jax' and module.startswith(p + '.')):
        return i
  raise AssertionError(f'{module} is on no floor: add its folder to FLOORS (and docs/DESIGN.md)')


def test_imports_flow_down_the_floors():
  mods = modules()
  up = [
      f'{m} imports {t}'
      for m, p in mods.items()
      for target, _, _ in project_imports(p, mods)
      if (t := _resolve(target, mods)) and floor(t) < floor(m) and (m, t) not in UPWARD
  ]
  assert up == []


def test_no_import_cycle():
  assert cycles(graph(modules())) == []


def test_every_project_import_names_a_module_of_the_tree():
  mods = modules()
  wrong = [
      f'{module_name(p)}:{line} imports {t}'
      for p in mods.values()
      for t, line, _ in project_imports(p, mods)
      if t not in mods
  ]
  assert wrong == []


def test_no_stage_imports_another_stage():
  mods = modules()
  stages = {m for m in mods if m.startswith('cai_jax.stages.')}
  wrong = [
      f'{m} imports {t}'
      for m in sorted(stages)
      for t, _, _ in project_imports(mods[m], mods)
      if _resolve(t, mods) in stages - {m}
  ]
  assert wrong == []


def test_function_level_imports_of_the_project_say_why():
  mods = modules()
  wrong = {m: lines for m, p in mods.items() if (lines := unexplained_function_imports(p, mods))}
  assert wrong == {}


def test_modules_are_short_or_say_why():
  assert [m for m, p in modules().items() if oversized(p)] == []
