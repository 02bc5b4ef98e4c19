"""records.py: the JSONL reader's torn-line repair and errors, and the schema check."""

import pytest

from cai_jax.utils import records


def test_repair_cuts_a_torn_tail_and_keeps_whole_lines(tmp_path):
  path = tmp_path / 'samples.jsonl'
  path.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "te')
  assert records.read_jsonl(path, repair=True) == [{'id': 'a'}, {'id': 'b'}]
  assert path.read_bytes() == b'{"id": "a"}\n\n{"id": "b"}\n'  # appending resumes here
  assert records.read_jsonl(tmp_path / 'absent.jsonl') == []


def test_malformed_line_and_missing_key_name_file_and_line(tmp_path):
  path = tmp_path / 'samples.jsonl'
  path.write_text('{"id": "a"}\n{"id": \n')
  with pytest.raises(records.RecordsError, match=r'samples\.jsonl:2: not JSON'):
    records.read_jsonl(path)
  path.write_text('{"prompt": "p", "responses": ["r"]}\n{"prompt": "q"}\n')
  with pytest.raises(
      records.RecordsError, match=r'samples\.jsonl:2: critique_revision record lacks responses'
  ):
    records.read_jsonl(path, records.HELPFUL)
