"""The README is the front door and docs/ holds the rest: every relative link in them resolves, and
the README stays short enough to read (issue 26)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [REPO / 'README.md', *(REPO / 'docs').glob('*.md')]
    + [*(REPO / 'experiments').rglob('*.md'), *(REPO / 'configs').rglob('*.md')]
)
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')  # [text](target)
FENCE = re.compile(r'^```.*?^```', re.M | re.S)


def relative_links(page):
  """(line, target) of each markdown link in `page` outside code blocks that is not a URL; the
  link's text may wrap over lines."""
  text = FENCE.sub(lambda m: '\n' * m.group().count('\n'), page.read_text())
  for m in LINK.finditer(text):
    if not re.match(r'[a-z][a-z0-9+.-]*:', m.group(1)):
      yield text.count('\n', 0, m.start()) + 1, m.group(1)


def anchors(page):
  """GitHub's anchors for `page`'s headings: lower case, punctuation dropped, spaces to '-'."""
  text = FENCE.sub('', page.read_text())
  return {
      re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
      for h in re.findall(r'^#+ (.*)$', text, re.M)
  }


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
  broken = []
  for number, target in relative_links(page):
    path, _, anchor = target.partition('#')
    dest = (page.parent / path).resolve() if path else page  # '#anchor': this page
    if not dest.exists():
      broken.append(f'{page.relative_to(REPO)}:{number}: {target} (no such file)')
    elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
      broken.append(f'{page.relative_to(REPO)}:{number}: {target} (no heading #{anchor})')
  assert not broken, '\n'.join(broken)


def test_readme_is_the_front_door():
  """At most ~150 lines, and it links every page of docs/ and the sweeps' guide."""
  readme = REPO / 'README.md'
  assert len(readme.read_text().splitlines()) <= 150
  linked = {(REPO / path.partition('#')[0]).resolve() for _, path in relative_links(readme)}
  pages = {*(REPO / 'docs').glob('*.md'), REPO / 'experiments' / 'README.md'}
  missing = sorted(str(p.relative_to(REPO)) for p in pages if p.resolve() not in linked)
  assert not missing, f'pages the README does not link: {missing}'


@pytest.mark.parametrize('page', sorted((REPO / 'docs').glob('*.md')), ids=lambda p: p.name)
def test_each_docs_page_links_back_to_the_readme(page):
  if page.name == 'DESIGN.md':
    pytest.skip('DESIGN.md is the contracts document, redrawn with the code')
  assert '../README.md' in {t.partition('#')[0] for _, t in relative_links(page)}
