"""The read commands' cheap parts: no agent import for status, JSON output, line ids."""

import json
import subprocess
import sys

from maildrop import agent, cli
from maildrop import events as E
from tests.factories import FeedWriter


def test_status_reads_the_agent_file_without_importing_the_agent():
    assert cli.AGENT_STATUS_FILE == agent.STATUS_FILE
    code = ("import sys, types; from maildrop import cli; "
            "cli._agent_state(types.SimpleNamespace(state_dir=__import__('pathlib').Path('/nonexistent'))); "
            "print('maildrop.agent' in sys.modules, 'paramiko' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_json_output_is_the_same_document():
    doc = {"b": [1, {"x": [1, 2], "y": "é\u202e"}], "a": {"q": {"z": 1}}, "e": [], "d": {}, "n": None,
           "t": [{"id": "x", "nested": {"deep": [1, {"k": "v"}]}}]}
    text = cli._json_lines(doc, 0)
    assert json.loads(text) == doc
    assert text.isascii()  # every non-ASCII character escaped, as json.dump did
    assert '\n  "e": [],\n' in text  # top-level keys one a line


def test_line_id_finds_the_top_level_id():
    w = FeedWriter("NodeA")
    tricky = '","id":"' + "f" * 64 + '"'  # a value that spells a top-level id (escaped in the line)
    evs = [w.add(E.NODE_CONFIGURED, {"id": "NodeA", "display_name": tricky, "address": "127.0.0.1:7000",
                                     "key": w.key.public_line}), w.link("NodeB")]
    for ev in evs:
        assert cli._line_id(ev.to_line()) == ev.id
    spaced = json.dumps(evs[0].to_dict(), indent=1).replace("\n", " ").encode()  # not canonical
    assert cli._line_id(spaced) == evs[0].id
    assert cli._line_id(b"not json") is None
    assert cli._line_id(b"[1, 2]") is None
